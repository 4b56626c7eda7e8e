"""Which labelled machines the reap flow may destroy. It errs on the side of keeping.

`run_is_active(label)` answers LIVE, ACTIVE, GONE, FOREIGN or UNKNOWN (infra/reaper.py), asking this
Prefect server only about labels that prove this installation made them (`qat-<installation id>-<flow
run id>`, tasks/labels.py); a label carrying another installation's id is FOREIGN (never destroyed by
age: its own reaper judges it). LIVE: Running and sending heartbeats (never destroyed by age: the
reaper logs an error and emits the Prefect event `qat.reaper.kept-past-age` instead). GONE only when
the server itself says so, in so many words:
- the flow run is not found (HTTP 404 "Flow run not found" on the server holding our installation id);
- the run is in a final state (Completed, Failed, Crashed, Cancelled);
- the run is Running but stopped sending heartbeats: a flow process killed with SIGKILL (with its
  worker) leaves its run in Running forever, so a Running run counts as alive only while it keeps
  sending them (PREFECT_FLOWS_HEARTBEAT_FREQUENCY, set for every deployment in prefect.yaml); one
  that never sent any is ACTIVE.
Anything else is UNKNOWN and the machine is kept: a label not in our format, a timeout, a 5xx, a
refused connection, an unexpected answer. Age alone decides for those.

`reap_labelled` destroys a machine for its run only on the second GONE verdict in a row. The
verdicts of the previous pass, and when it first saw each instance whose row has no start date (its
age is counted from then), are kept in a JSON file, $QAT_REAPER_STATE or
$PREFECT_HOME/qat-reaper-state.json on the reaper's worker (the reap deployment runs every 10
minutes, one run at a time); a missing or unreadable file means no earlier verdict (keep) and no
earlier sighting (age 0)."""
from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

from prefect import get_client
from prefect.client.schemas.objects import StateType
from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter
from prefect.exceptions import ObjectNotFound

from infra.reaper import ACTIVE, FOREIGN, GONE, LIVE, UNKNOWN, reap_instances

from . import labels, secrets

LIVE_STATES = {StateType.RUNNING, StateType.PENDING, StateType.SCHEDULED, StateType.PAUSED, StateType.CANCELLING}
FINAL = {StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED}
HEARTBEAT = "prefect.flow-run.heartbeat"
MISSED_BEATS = 3
NOT_FOUND = "Flow run not found"  # the server's 404 detail (prefect/server/api/flow_runs.py)
KEPT_PAST_AGE = "qat.reaper.kept-past-age"  # the event for a live or foreign machine past the age limit


def _heartbeat_s() -> int:
    return max(30, int(os.environ.get("PREFECT_FLOWS_HEARTBEAT_FREQUENCY") or 30))


def _heartbeats(client, run_id: str, since: dt.datetime) -> int:
    page = client.read_events(EventFilter(event=EventNameFilter(name=[HEARTBEAT]),
                                          resource=EventResourceFilter(id=[f"prefect.flow-run.{run_id}"]),
                                          occurred=EventOccurredFilter(since=since)), limit=1)
    return page.total


def _says_not_found(e: ObjectNotFound) -> bool:
    """A 404 whose body is the server's own 'Flow run not found' (not a proxy's or a wrong path's)."""
    try:
        return e.http_exc.response.json().get("detail") == NOT_FOUND
    except Exception:
        return False


def run_is_active(label: str) -> str:
    """LIVE, ACTIVE, GONE, FOREIGN or UNKNOWN for the flow run named by a label (module docstring)."""
    parsed = labels.parse_label(label)
    if parsed is None:
        return UNKNOWN  # not a label this installation makes: age decides
    try:
        with get_client(sync_client=True) as client:
            ours = labels.installation_id(create=False, client=client)
            if ours is None:
                return UNKNOWN  # this server never made a label: it cannot tell ours from theirs
            if ours != parsed.installation:
                return FOREIGN  # another installation's run: not ours to judge, nor to destroy by age
            try:
                fr = client.read_flow_run(parsed.run_id)
            except ObjectNotFound as e:
                return GONE if _says_not_found(e) else UNKNOWN
            if fr.state is None:
                return UNKNOWN
            if fr.state.type in FINAL:
                return GONE
            if fr.state.type != StateType.RUNNING:
                return ACTIVE if fr.state.type in LIVE_STATES else UNKNOWN
            now = dt.datetime.now(dt.timezone.utc)
            if not _heartbeats(client, str(parsed.run_id), now - dt.timedelta(days=30)):
                return ACTIVE  # never sent one: heartbeats are off for it, age decides
            recent = _heartbeats(client, str(parsed.run_id), now - dt.timedelta(seconds=MISSED_BEATS * _heartbeat_s()))
            return LIVE if recent > 0 else GONE
    except Exception:  # timeout, 5xx, refused, garbled: cannot tell, keep it
        return UNKNOWN


def state_file() -> Path:
    if os.environ.get("QAT_REAPER_STATE"):
        return Path(os.environ["QAT_REAPER_STATE"])
    from prefect.settings import PREFECT_HOME

    return Path(PREFECT_HOME.value()) / "qat-reaper-state.json"


def _load(path: Path, key: str, kind) -> dict:
    try:
        data = json.loads(path.read_text())
        return {str(k): kind(v) for k, v in data.get(key, {}).items()}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


def load_suspects(path: Path) -> dict[str, int]:
    return _load(path, "suspects", int)


def load_first_seen(path: Path) -> dict[str, float]:
    """str(instance id) -> when the reaper first saw it without a start date (epoch s)."""
    return _load(path, "first_seen", float)


def save_suspects(path: Path, suspects: dict[str, int], first_seen: dict[str, float] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"suspects": suspects, "first_seen": first_seen or {},
                               "updated": dt.datetime.now(dt.timezone.utc).isoformat()}, indent=1))
    os.replace(tmp, path)


def kept_past_age(log_error):
    """The reaper's `alarm`: an error in the flow's log and a Prefect event naming the instance."""
    def alarm(a: dict) -> None:
        log_error(a["message"])
        try:
            from prefect.events import emit_event

            emit_event(KEPT_PAST_AGE, resource={"prefect.resource.id": f"{a['backend']}.instance.{a['instance_id']}",
                                                "qat.label": a["label"], "qat.verdict": a["verdict"]},
                       payload={"age_h": a["age_h"], "message": a["message"]})
        except Exception as e:  # the log line above is the record; an event is a bonus
            log_error(f"could not emit the {KEPT_PAST_AGE} event: {type(e).__name__}")
    return alarm


def reap_labelled(max_age_hours: float, dry_run: bool, log, state_path: Path | None = None,
                  log_error=None) -> list[dict]:
    """Destroy labelled instances older than max_age_hours or whose run was judged GONE twice in a row
    (never by age a LIVE or FOREIGN one: `log_error` says so, default `log`, and an event is emitted)."""
    credentials = secrets.all_credentials()  # each backend's own, checked before any request
    path = state_path or state_file()
    suspects, first_seen = load_suspects(path), load_first_seen(path)
    rows = reap_instances(credentials, max_age_hours=max_age_hours,
                          run_status=run_is_active, suspects=suspects, dry_run=dry_run, log=log,
                          first_seen=first_seen, alarm=kept_past_age(log_error or log))
    if not dry_run:
        try:
            save_suspects(path, suspects, first_seen)
        except OSError as e:  # next pass starts from no verdict: it keeps, never destroys early
            log(f"could not save the reaper's verdicts to {path}: {e}")
    return rows
