"""A person's approval before the upload (hub.approval: required), under the real stack: Prefect
server, a Runner serving the qat deployment, the Vast.ai emulator with real sshd, the local Hub.

Each run is suspended after the machine is destroyed and the gate passed: no machine, no process.
The form is answered through Prefect's API (`resume_flow_run` with `run_input`), as a user or the
dashboard's Resume button does; the answered run re-runs from the top and rents nothing."""
from __future__ import annotations

import json
import secrets
from pathlib import Path
from uuid import UUID

import pytest

from devtools.services import wait_for
from hub_server import hub_fixture
from prefect_api import prefect_api

TOKEN = "hf_approval" + secrets.token_hex(8)
FAST = {"train.max_steps": 2, "train.save_every": 2, "train.eval_every": 2, "data.max_eval_samples": 2,
        "bench.max_clips": 1, "eval.bootstrap_samples": 20, "name": "approval", "hub.approval": "required"}


# ------------------------------------------------------------------ the config and the report line

def test_scheduled_configs_require_approval_and_the_unattended_ones_do_not():
    import yaml

    from contract.config import ConfigError, HubConfig, load_config
    from contract.layout import REPO_ROOT

    assert HubConfig().approval == "required"  # a config that says nothing asks a person
    deployed = {d["parameters"]["config"] for d in yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())["deployments"]
                if d["entrypoint"] == "flows/qat.py:qat"}
    assert deployed == {"int8", "int4", "demo"}
    for name in ("int8", "int4"):
        assert load_config(name).hub.approval == "required"
    for name in ("demo", "tiny"):  # make demo and the tests run without anyone answering
        assert load_config(name).hub.approval == "none"
    for bad in ({"hub.approval": "yes"}, {"hub.approval_timeout_hours": 0}, {"hub.approval_timeout_hours": 10**6}):
        with pytest.raises(ConfigError, match="hub.approval"):
            load_config("tiny", bad)


def test_the_report_says_who_answered_with_the_note_escaped():
    from contract.config import load_config
    from tasks.report import render_report

    md = render_report(load_config("tiny"), None, {}, [], {}, {"passed": True, "reason": "ok"},
                       {"uploaded": False, "path": "/x", "reason": "approval: rejected"},
                       {"line": "rejected by Eve on 2026-12-06 10:00 UTC: see <img src=x> | [link](http://e)"})
    line = next(x for x in md.splitlines() if x.startswith("- approval: "))
    assert "rejected by Eve on 2026-12-06 10:00 UTC" in line and "<img" not in line and "](http" not in line, line


# ------------------------------------------------------------------ end to end (real everything)

hub = hub_fixture({TOKEN: ("reviewer", "write")}, scope="module")


@pytest.fixture(scope="module")
def stack_options(hub) -> dict:
    return {"env": {"HF_TOKEN": TOKEN, "HF_ENDPOINT": hub.url}, "reaper": False}


def _suspended(stack, run_id: str, timeout: float = 1200):
    """Wait until the run is suspended and its process has exited; returns the state."""
    state = wait_for(lambda: (s := stack.state(run_id)) is not None and (s.is_paused() or s.is_final()) and s,
                     timeout, 1, f"flow run {run_id} to ask for approval")
    assert state.is_paused() and state.name == "Suspended", (state.type, state.name, state.message)
    wait_for(lambda: stack.flow_pid(run_id) is None, 120, 1, "the suspended run's process to exit")
    return state


def _answer(stack, run_id: str, **run_input) -> None:
    from prefect.flow_runs import resume_flow_run

    with prefect_api(stack.api_url):
        resume_flow_run(UUID(run_id), run_input=run_input)


def _report(stack, run_id: str) -> str:
    """The newest version of the run's report artifact."""
    reports = [a for a in stack.artifacts(run_id) if a.key == "qat-approval-report"]
    return max(reports, key=lambda a: a.created).data


def _form(stack, run_id: str) -> str:
    with stack.client() as c:
        return c.read_flow_run_input(UUID(run_id), "suspended-approval-description")


def _nothing_rented_while_waiting(stack, run_id: str) -> None:
    """The machine was destroyed before the wait: no live instance, every one ended."""
    assert stack.instances(run_id) and not stack.live(run_id), stack.instances(run_id)


def _rents(stack, run_id: str) -> int:
    return sum(1 for name, _ in stack.task_states(run_id) if name.startswith("rent machine"))


def _run_dir(stack, run_id: str) -> Path:
    dirs = sorted((stack.runs_dir / "approval").glob(f"*-{run_id}"))
    assert len(dirs) == 1, dirs  # the re-run after the answer found its own run directory again
    return dirs[0]


@pytest.mark.slow
def test_reject_uploads_nothing_and_the_report_says_who(stack, hub):
    repo = "reviewer/approval-reject"
    run_id = stack.submit(overrides={**FAST, "hub.repo_id": repo})
    _suspended(stack, run_id)
    _nothing_rented_while_waiting(stack, run_id)
    form = _form(stack, run_id)
    assert "Quality gate **passed**" in form and "qat_int8" in form and "qat-approval-report" in form, form
    assert "file://" in form and repo in form, form
    waiting = _report(stack, run_id)
    assert "waiting since" in waiting and "nothing is uploaded" in waiting, waiting

    with pytest.raises(RuntimeError, match="by"):  # the form needs a name: refused, still suspended
        _answer(stack, run_id, decision="reject", note="no name")
    assert stack.state(run_id).is_paused()

    _answer(stack, run_id, decision="reject", by="Alice", note="WER too close to the limit")
    state = stack.wait_final(run_id, 900)
    assert state.is_completed(), state.message
    assert hub.repo_files(repo) == {}
    report = _report(stack, run_id)
    assert "approval: rejected by Alice on " in report and "WER too close to the limit" in report, report
    assert "nothing was uploaded" in report
    assert "## Machine" in report  # the bill of the first pass came back from the run directory
    # The re-run rented nothing: one machine in all, one rent task, the same run directory.
    assert len(stack.instances(run_id)) == 1 and _rents(stack, run_id) == 1
    record = json.loads((_run_dir(stack, run_id) / "approval.json").read_text())
    assert record["answer"]["decision"] == "reject" and record["answer"]["by"] == "Alice"


@pytest.mark.slow
def test_approve_uploads_with_the_note_in_the_report(stack, hub):
    repo = "reviewer/approval-approve"
    run_id = stack.submit(overrides={**FAST, "hub.repo_id": repo})
    _suspended(stack, run_id)
    assert hub.repo_files(repo) == {}  # nothing before the answer
    _answer(stack, run_id, decision="approve", by="Bob", note="checked the scorecard")
    state = stack.wait_final(run_id, 900)
    assert state.is_completed(), state.message
    assert any(name.endswith(".onnx") for name in hub.repo_files(repo)), hub.repo_files(repo)
    report = _report(stack, run_id)
    assert "approval: approved by Bob on " in report and "checked the scorecard" in report, report
    assert _rents(stack, run_id) <= 1
    _run_dir(stack, run_id)


@pytest.mark.slow
def test_no_answer_by_the_timeout_uploads_nothing(stack, hub):
    repo = "reviewer/approval-timeout"
    run_id = stack.submit(overrides={**FAST, "hub.repo_id": repo, "hub.approval_timeout_hours": 0.01})
    _suspended(stack, run_id)
    assert not stack.live(run_id)
    state = stack.wait_final(run_id, 300)
    assert state.is_failed() and "never resumed" in (state.message or ""), state.message
    assert hub.repo_files(repo) == {}
    report = _report(stack, run_id)
    assert "no answer by" in report and "nothing is uploaded" in report, report


@pytest.mark.slow
def test_a_direct_call_waits_in_its_own_process(stack, hub, monkeypatch):
    """Called from Python, no deployment can reschedule the run: it waits paused in the caller's
    process, and an answer through the API lets it go on."""
    import threading

    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType

    from flows.qat import qat

    for key, value in (("QAT_RUNS_DIR", str(stack.runs_dir)), ("VAST_API_KEY", stack.api_key), ("VAST_URL", stack.emu.url),
                       ("HF_TOKEN", TOKEN), ("HF_ENDPOINT", hub.url)):  # a run that could upload: it is asked
        monkeypatch.setenv(key, value)
    repo = "reviewer/approval-direct"
    answered: list[str] = []

    def answer():
        paused = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=["PAUSED"])))
        def find():
            with stack.client() as c:
                return [r for r in c.read_flow_runs(flow_run_filter=paused) if r.deployment_id is None]

        run = wait_for(find, 1200, 2, "the direct call to pause")[0]
        assert run.state.name == "Paused"
        _answer(stack, str(run.id), decision="reject", by="Carol", note="direct")
        answered.append(str(run.id))

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    with prefect_api(stack.api_url):
        state = qat(config="tiny", overrides={**FAST, "hub.repo_id": repo}, return_state=True)
    thread.join(timeout=60)
    assert answered and state.is_completed(), state.message
    assert state.result()["approval"].startswith("rejected by Carol on ")
    assert hub.repo_files(repo) == {}
