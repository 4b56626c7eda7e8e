"""The `reap` flow: the last layer of teardown. Every 10 minutes it destroys labelled instances
whose flow run is no longer running, or that are older than a deadline (tasks/reaping.py)."""
from __future__ import annotations

from prefect import flow, get_run_logger

from tasks.reaping import reap_labelled


@flow(name="reap")
def reap(max_age_hours: float = 24.0, dry_run: bool = False) -> list[dict]:
    log = get_run_logger()
    out = reap_labelled(max_age_hours, dry_run, log.info)
    log.info("reaped %d instance(s)", len(out))
    return out
