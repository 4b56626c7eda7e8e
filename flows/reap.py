"""The `reap` flow: the last layer of teardown. Every 10 minutes, on its own work pool and worker
(`qat-reaper`, so that it survives the loss of the worker it backs up), it destroys labelled
instances older than a deadline, or whose flow run this server declared gone in two checks in a row;
anything it cannot judge for sure it keeps (tasks/reaping.py)."""
from __future__ import annotations

from prefect import flow, get_run_logger

from tasks.reaping import reap_labelled


@flow(name="reap")
def reap(max_age_hours: float = 24.0, dry_run: bool = False) -> list[dict]:
    log = get_run_logger()
    out = reap_labelled(max_age_hours, dry_run, log.info, log_error=log.error)
    log.info("reaped %d instance(s)", len(out))
    return out
