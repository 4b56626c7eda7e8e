"""The `reap` flow: the last layer of teardown. Every 10 minutes it destroys labelled instances
whose flow run is no longer running (or that are older than a deadline)."""
from __future__ import annotations

from uuid import UUID

from prefect import flow, get_client, get_run_logger
from prefect.client.schemas.objects import StateType

from infra import reaper
from tasks import secrets

ACTIVE = {StateType.RUNNING, StateType.PENDING, StateType.SCHEDULED, StateType.PAUSED, StateType.CANCELLING}


def run_is_active(label: str) -> bool:
    """True while the flow run named by the label (qat-<flow run id>) may still use its machine."""
    run_id = label.removeprefix("qat-")
    try:
        UUID(run_id)
    except ValueError:
        return False  # not one of ours in the usual shape: age decides
    with get_client(sync_client=True) as client:
        try:
            fr = client.read_flow_run(UUID(run_id))
        except Exception:
            return False
    return fr.state is not None and fr.state.type in ACTIVE


@flow(name="reap")
def reap(max_age_hours: float = 24.0, dry_run: bool = False) -> list[dict]:
    log = get_run_logger()
    key = secrets.vast_api_key()
    if not key:
        log.warning("no Vast.ai API key (env VAST_API_KEY or Secret block 'vast-api-key'): nothing to reap")
        return []
    out = reaper.reap(api_key=key, server_url=secrets.vast_url(), max_age_hours=max_age_hours,
                      is_run_active=run_is_active, dry_run=dry_run, log=log.info)
    log.info("reaped %d instance(s)", len(out))
    return out
