"""Prefect tasks: one per box of the qat DAG. They pass plain data (validated configs, leases as
dataclasses, result dicts) so that retries and re-runs never depend on in-memory connections."""
