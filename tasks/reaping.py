"""Which labelled machines the reap flow may destroy: their flow run's liveness, read from Prefect.

A flow process killed with SIGKILL (with its worker) leaves its run in Running forever, so a
Running run counts as alive only while it keeps sending heartbeats (PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
set for every deployment in prefect.yaml). A run that never sent one is judged by age alone."""
from __future__ import annotations

import datetime as dt
import os
from uuid import UUID

from prefect import get_client
from prefect.client.schemas.objects import StateType
from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter

from infra.reaper import reap_instances

from . import secrets

ACTIVE = {StateType.RUNNING, StateType.PENDING, StateType.SCHEDULED, StateType.PAUSED, StateType.CANCELLING}
HEARTBEAT = "prefect.flow-run.heartbeat"
MISSED_BEATS = 3


def _heartbeat_s() -> int:
    return max(30, int(os.environ.get("PREFECT_FLOWS_HEARTBEAT_FREQUENCY") or 30))


def _heartbeats(client, run_id: str, since: dt.datetime) -> int:
    page = client.read_events(EventFilter(event=EventNameFilter(name=[HEARTBEAT]),
                                          resource=EventResourceFilter(id=[f"prefect.flow-run.{run_id}"]),
                                          occurred=EventOccurredFilter(since=since)), limit=1)
    return page.total


def run_is_active(label: str) -> bool:
    """True while the flow run named by the label (qat-<flow run id>) may still use its machine."""
    run_id = label.removeprefix("qat-")
    try:
        UUID(run_id)
    except ValueError:
        return False  # not a flow run id: age decides
    now = dt.datetime.now(dt.timezone.utc)
    with get_client(sync_client=True) as client:
        try:
            fr = client.read_flow_run(UUID(run_id))
        except Exception:
            return False  # no such run: nobody will destroy its machine but us
        if fr.state is None or fr.state.type not in ACTIVE:
            return False
        if fr.state.type != StateType.RUNNING:
            return True
        ever = _heartbeats(client, run_id, now - dt.timedelta(days=30))
        if not ever:
            return True
        return _heartbeats(client, run_id, now - dt.timedelta(seconds=MISSED_BEATS * _heartbeat_s())) > 0


def reap_labelled(max_age_hours: float, dry_run: bool, log) -> list[dict]:
    """Destroy labelled instances older than max_age_hours or whose run is no longer active."""
    key = secrets.vast_api_key()
    if not key:
        log("no Vast.ai API key (env VAST_API_KEY or Secret block 'vast-api-key'): nothing to reap")
        return []
    return reap_instances(api_key=key, server_url=secrets.vast_url(), max_age_hours=max_age_hours,
                          is_run_active=run_is_active, dry_run=dry_run, log=log)
