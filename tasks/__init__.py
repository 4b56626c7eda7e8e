"""The orchestrator's side: the Prefect tasks of the qat DAG (a few modules define them) and what the
orchestrator decides beside them (budget, retries, verdict, labels, secrets, the run directory). Tasks
pass plain data (validated configs, leases as dataclasses, result dicts) so that retries and re-runs
never depend on in-memory connections."""
