"""A person's approval before a model is published (`hub.approval: required`).

Asked only when there is something to publish (tasks/upload.py `upload_held` found no reason not to:
the gate passed, `hub.repo_id` is set, the published model is not better, the files are new), after
the machine was destroyed. `await_approval` then records the run's bill in `<run dir>/approval.json`,
publishes the report (it says what is awaited, until when) and waits for Prefect's input form
(`ApprovalForm`: approve or reject, a name, a note), whose description holds the scorecard and the links.

A run of a deployment is *suspended* (`suspend_flow_run`): its process exits, so it holds no worker
slot, no deployment concurrency slot and no machine while it waits. Answered, Prefect schedules it
again and it re-runs from the top: its run directory is found by the flow run id, every step is done
at home (nothing is rented), the gate is recomputed, and here the answer is read and the bill of the
first pass comes back from approval.json. Unanswered by `hub.approval_timeout_hours`, the Prefect
server fails the run: nothing is uploaded, as the report published before the wait says. A flow
called directly (no deployment, nothing to reschedule it) waits in its own process (`pause_flow_run`),
and fails the same way at the deadline.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path
from typing import Literal, Optional

from prefect import get_client, get_run_logger
from prefect.context import FlowRunContext
from prefect.flow_runs import pause_flow_run, suspend_flow_run
from prefect.input import RunInput
from prefect.runtime import flow_run
from prefect.settings import get_current_settings
from pydantic import Field

from contract.catalogue import quantized_variant
from contract.config import RunConfig
from infra.machines.machine import Lease

from .report import publish_report
from .scorecard import gate_verdict, results_markdown, results_table, step_metrics
from .verdict import verified_metrics

KEY = "approval"  # the pause key: a re-run of the same flow run finds its answer under it
RECORD = "approval.json"


class ApprovalForm(RunInput):
    """The form Prefect shows on the suspended run ("Resume" in the dashboard)."""

    decision: Literal["approve", "reject"] = Field(
        description="approve: upload the model to the Hub repo now; reject: upload nothing")
    by: str = Field(min_length=1, max_length=100, description="your name: the report records who answered")
    note: str = Field(default="", max_length=2000, description="why: goes into the report")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _when(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _model_dir(cfg: RunConfig, run_dir: Path) -> str:
    return str(run_dir / "work" / "convert" / quantized_variant(cfg.quant.scheme))


def _links(cfg: RunConfig, run_dir: Path) -> list[str]:
    """The flow run and the report artifact in the Prefect UI (when its address is known), the run directory."""
    ui = (get_current_settings().ui_url or "").rstrip("/")
    key = f"qat-{cfg.name}-report"
    return [f"- this flow run: {ui}/runs/flow-run/{flow_run.get_id()}" if ui else f"- flow run {flow_run.get_id()}",
            f"- the report artifact: {ui}/artifacts/key/{key}" if ui else f"- the report artifact: key {key}",
            f"- the run directory: {run_dir.resolve().as_uri()} (report/report.md, work/)"]


def describe(cfg: RunConfig, gate: dict, results: dict, run_dir: Path, deadline: dt.datetime) -> str:
    """The form's description: what would be published, the scorecard, the links, the deadline."""
    rows = results_table(cfg.quant.scheme, verified_metrics(step_metrics(results), gate or {}))
    return "\n".join([
        f"## Publish `{cfg.name}` to `{cfg.hub.repo_id}`?", "",
        f"Approve to upload the QAT {cfg.quant.scheme} model ({'private' if cfg.hub.private else 'public'} repo); "
        f"reject to upload nothing. With no answer by {_when(deadline)} nothing is uploaded.", "",
        gate_verdict(gate, cfg.quant.scheme, cfg.eval.max_wer_degradation), "",
        *results_markdown(rows, name="variant"), "",
        *_links(cfg, run_dir)])


def _bill(record: dict) -> tuple[Optional[Lease], list[dict], dict]:
    lease = record.get("lease")
    return (Lease(**lease) if lease else None), list(record.get("costs") or []), dict(record.get("estimate") or {})


def _answered_at(answer: ApprovalForm) -> dt.datetime:
    """When the answer reached Prefect (the run input's creation time); now if it cannot be read."""
    try:
        with get_client(sync_client=True) as client:
            found = client.filter_flow_run_input(answer.metadata.receiver, answer.metadata.key, 1, set())
        return found[0].created if found and found[0].created else _now()
    except Exception:  # noqa: BLE001 - the time is for the report only
        return _now()


def await_approval(cfg: RunConfig, gate: dict, held: Optional[dict], run_dir: Path, lease: Optional[Lease],
                   results: dict, costs: list[dict], estimate: dict) -> tuple[dict, Optional[Lease], list[dict], dict]:
    """(approval, lease, costs, estimate). `approval["upload"]` says whether the upload may go on;
    when it may not, `approval["link"]` is the report's model link and why nothing was uploaded.
    `approval["line"]` is the report's approval line. The bill is this run's, read back from the
    run directory on the re-run after a suspension. `held` (tasks/upload.py `upload_held`) is the model
    link when this run would publish nothing (gate failed, no repo, the published model is better,
    nothing new): nobody is asked then."""
    if held is not None:
        return {"upload": False, "line": "not asked: nothing to publish", "link": held}, lease, costs, estimate
    if cfg.hub.approval == "none":
        return {"upload": True, "line": "not required (hub.approval: none)"}, lease, costs, estimate
    log = get_run_logger()
    path = run_dir / RECORD
    record = json.loads(path.read_text()) if path.is_file() else None
    if record is None:  # the first pass: the machine is gone; keep its bill for the re-run, then ask
        asked = _now()
        deadline = asked + dt.timedelta(hours=cfg.hub.approval_timeout_hours)
        record = {"asked_at": asked.isoformat(), "deadline": deadline.isoformat(),
                  "lease": dataclasses.asdict(lease) if lease else None, "costs": costs, "estimate": estimate}
        path.write_text(json.dumps(record, indent=1))
        waiting = (f"waiting since {_when(asked)} for a person to approve or reject the upload (the run's "
                   f"\"Resume\" form in Prefect); no answer by {_when(deadline)}: nothing is uploaded and the run fails")
        publish_report(cfg, lease, results, costs, estimate, gate,
                       {"uploaded": False, "reason": "waiting for a person's approval", "path": _model_dir(cfg, run_dir)},
                       run_dir,
                       approval={"line": waiting})
    else:
        lease, costs, estimate = _bill(record)
        deadline = dt.datetime.fromisoformat(record["deadline"])
    form = ApprovalForm.with_initial_data(description=describe(cfg, gate, results, run_dir, deadline))
    seconds = max(1, round((deadline - _now()).total_seconds()))
    log.info("waiting for approval of the upload to %s until %s", cfg.hub.repo_id, _when(deadline))
    # Unanswered by the deadline: the server fails a suspended run; pause_flow_run raises FlowPauseTimeout.
    if FlowRunContext.get().flow_run.deployment_id:
        answer = suspend_flow_run(wait_for_input=form, key=KEY, timeout=seconds)
    else:
        answer = pause_flow_run(wait_for_input=form, key=KEY, timeout=seconds)
    at = _answered_at(answer)
    approved = answer.decision == "approve"
    line = (f"{'approved' if approved else 'rejected'} by {answer.by} on {_when(at)}"
            + (f": {answer.note}" if answer.note else "") + ("" if approved else "; nothing was uploaded"))
    record["answer"] = {"decision": answer.decision, "by": answer.by, "note": answer.note, "at": at.isoformat()}
    path.write_text(json.dumps(record, indent=1))
    log.info("approval: %s", line)
    approval = {"upload": approved, "line": line}
    if not approved:
        approval["link"] = {"uploaded": False, "reason": f"approval: {line}", "path": _model_dir(cfg, run_dir)}
    return approval, lease, costs, estimate
