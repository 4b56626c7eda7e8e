"""Prefect tasks: one per box of the qat DAG. They pass plain data (configs as dicts, leases as
dataclasses) so that retries and re-runs never depend on in-memory connections."""
