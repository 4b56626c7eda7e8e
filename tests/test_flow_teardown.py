"""The qat flow gives its machine back on every failure path, fast (no `make chaos` needed).

Each test runs the real `qat` flow function under a Prefect test server against the Vast.ai emulator
(real sshd instances, per-second billing, a ledger), with the `tiny` config. Failures are injected at
the step level: the interpreter the flow runs steps with is swapped for a wrapper that replaces one
step's body (`steps.<step>.run`) before `python -m steps` runs, so the rest (step classification,
exit codes, STEP_ERROR lines, copy home, retries, teardown) is the real code. Every test ends with
the emulator showing no instance alive (the `emulator` fixture fails the test otherwise) and the
ledger showing each instance ended by a destroy.
"""
from __future__ import annotations

import asyncio
import glob
import os
import re
import sys
import threading
import time
from pathlib import Path

import pytest

WRAPPER = '''#!{python}
"""python -m steps <step> ..., with one step's body replaced (tests/test_flow_teardown.py)."""
import errno, os, runpy, sys, time
sys.path.insert(0, os.getcwd())  # the code dir on the machine, as `python -m` would
args = sys.argv[1:]
step = args[2] if args[:2] == ["-m", "steps"] and len(args) > 2 else None
FAULTS = {faults!r}
MARKER = {marker!r}
fault = FAULTS.get(step)
if fault:
    import importlib
    mod = importlib.import_module("steps." + step)
    real = mod.run
    def run(ctx):
        if fault == "error":
            raise ValueError("injected deterministic failure")
        if fault == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device", "checkpoints/step-2")
        if fault == "silent":
            time.sleep(600)  # prints nothing: only the budget timer can notice the spending
        if fault == "hang_once":  # first machine: train for real, then hang before result.json
            if not os.path.exists(MARKER):
                open(MARKER, "w").close()
                real(ctx)
                time.sleep(600)
        return real(ctx)
    mod.run = run
sys.argv = ["steps", *args[2:]]
runpy.run_module("steps", run_name="__main__", alter_sys=True)
'''


@pytest.fixture
def vast(emulator, fast_polling, tmp_path, monkeypatch):
    """The emulator as the flow's Vast.ai, with fast polling; yields it."""
    monkeypatch.setenv("VAST_API_KEY", emulator.api_key)
    monkeypatch.setenv("VAST_URL", emulator.url)
    monkeypatch.setenv("QAT_RUNS_DIR", str(tmp_path / "runs"))
    return emulator


def inject(monkeypatch, tmp_path, **faults: str) -> None:
    """Steps run through a wrapper that replaces `faults` {step: error|enospc|silent|hang_once}."""
    import tasks.remote_step

    path = tmp_path / "python-with-faults"
    path.write_text(WRAPPER.format(python=sys.executable, faults=faults, marker=str(tmp_path / "first-machine")))
    path.chmod(0o755)
    monkeypatch.setattr(tasks.remote_step, "remote_python", lambda lease, cfg: str(path))


def run_qat(**overrides):
    from flows.qat import qat

    return qat(config="tiny", overrides=overrides, return_state=True)


def assert_all_destroyed(emu, count: int) -> list[dict]:
    rows = [r for r in emu.ledger()["instances"] if r["label"].startswith("qat-")]
    assert len(rows) == count, rows
    assert emu.live_instances() == []
    for r in rows:
        assert r["ended_at"] is not None and r["end_reason"] == "destroyed", r
    return rows


async def _artifacts(flow_run_id) -> dict:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async with get_client() as client:
        arts = await client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in arts if a.key}


def cost_table(state) -> list[dict]:
    import json

    arts = asyncio.run(_artifacts(state.state_details.flow_run_id))
    assert "qat-tiny-cost" in arts, sorted(arts)
    data = arts["qat-tiny-cost"].data
    return json.loads(data) if isinstance(data, str) else data


def test_an_estimate_over_the_cap_is_refused_before_anything_is_rented(prefect_server, vast):
    state = run_qat(**{"machine.max_cost_usd": 1e-6})
    assert state.is_failed()
    err = state.result(raise_on_failure=False)
    assert "exceeds machine.max_cost_usd" in str(err) and "raise the cap" in str(err), err
    assert vast.ledger()["instances"] == []  # nothing created, nothing billed


def test_step_error_destroys_the_machine(prefect_server, vast, tmp_path, monkeypatch):
    inject(monkeypatch, tmp_path, prepare="error")
    state = run_qat()
    assert state.is_failed()
    assert "injected deterministic failure" in str(state.message) + repr(state.result(raise_on_failure=False))
    assert_all_destroyed(vast, 1)
    rows = cost_table(state)  # a failed run still publishes what it spent
    assert any(r["step"] == "prepare" for r in rows) and any(r["step"] == "total" for r in rows)


def test_disk_full_step_destroys_the_machine(prefect_server, vast, tmp_path, monkeypatch):
    inject(monkeypatch, tmp_path, prepare="enospc")
    state = run_qat()
    assert state.is_failed()
    err = state.result(raise_on_failure=False)
    assert "disk is full" in str(err) and "not retried" in str(err), err
    assert_all_destroyed(vast, 1)
    runs = glob.glob(os.path.join(os.environ["QAT_RUNS_DIR"], "**", "prepare", "error.json"), recursive=True)
    assert runs, "the step's error report did not come home"


@pytest.mark.parametrize("faults,says", [
    ({"driver_cuda": 12.4}, "driver 550.127.05 supports CUDA 12.4, but torch 2.13.0 is built for CUDA 13.0"),
    ({"nvidia_smi": "fail"}, "nvidia-smi failed (exit 9"),
])
def test_gpu_run_on_a_machine_without_usable_cuda_fails_at_setup_and_destroys_it(prefect_server, vast, faults, says):
    """A run that needs a GPU, on a machine whose driver cannot serve the pinned torch (older than
    its offer said) or does not answer: setup fails deterministically (no retry, no step runs) and
    the machine is destroyed, instead of training on the CPU of a rented GPU until the budget cap."""
    vast.set_faults(**faults)
    # a GPU run plans 25 GB for the image and its CUDA venv (contract/disk.py): rent a disk that holds it
    state = run_qat(**{"machine.gpu": "required", "machine.vast.min_disk_gb": 30})
    assert state.is_failed()
    err = state.result(raise_on_failure=False)
    assert type(err).__name__ == "StepFailed" and "step setup failed (deterministic, not retried)" in str(err), err
    assert says in str(err)
    assert_all_destroyed(vast, 1)
    assert not any(r["step"] == "prepare" for r in cost_table(state))  # no step ran


def test_budget_stop_by_timer_destroys_the_machine(prefect_server, vast, tmp_path, monkeypatch):
    """A step that prints nothing for ten minutes: the timer finds the cap crossed and stops it."""
    from contract.config import load_config
    from contract.workload import run_workload
    from infra.backends.vast.instances import VastProvider

    cfg = load_config("tiny")
    dph = float(VastProvider(api_key=vast.api_key, server_url=vast.url).search_offers(
        cfg.machine.vast, workload=run_workload(cfg))[0]["dph_total"])
    life_s = 40  # the cap buys this much machine life: rent, push and set up fit, the silent step does not
    inject(monkeypatch, tmp_path, prepare="silent")
    state = run_qat(**{"machine.max_cost_usd": dph * life_s / 3600, "machine.planned_hours": 1e-6,
                            "machine.budget_check_every_s": 1})
    assert state.is_failed()
    err = state.result(raise_on_failure=False)
    assert type(err).__name__ == "BudgetExceeded" and "budget cap crossed" in str(err), err
    (row,) = assert_all_destroyed(vast, 1)
    assert row["seconds"] < 600, row  # stopped by the timer, not after the silent 600 s step
    rows = cost_table(state)
    assert any(r["step"] == "total" for r in rows)


@pytest.mark.slow
def test_lost_machine_resumes_from_checkpoint_on_a_second_and_both_are_destroyed(prefect_server, vast, tmp_path,
                                                                                monkeypatch):
    """Machine 1 is preempted mid-train once a checkpoint came home; machine 2 resumes from it.
    (convert then fails on purpose: the rest of the DAG has its own end-to-end test.)"""
    inject(monkeypatch, tmp_path, train="hang_once", convert="error")
    runs = Path(os.environ["QAT_RUNS_DIR"])
    preempted: list[int] = []

    def preempt_once_a_checkpoint_is_home():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if glob.glob(str(runs / "**" / "train" / "checkpoints" / "step-*"), recursive=True):
                live = [r for r in vast.live_instances() if (r.get("label") or "").startswith("qat-")]
                if live:
                    vast.set_faults(id=live[0]["id"], preempt_after_s=0)
                    preempted.append(live[0]["id"])
                    return
            time.sleep(0.3)

    watcher = threading.Thread(target=preempt_once_a_checkpoint_is_home, daemon=True)
    watcher.start()
    state = run_qat(**{"machine.checkpoint_sync_every_s": 1, "machine.ssh_timeout_s": 20})
    watcher.join(timeout=5)
    assert preempted, "no checkpoint came home to preempt after"
    assert state.is_failed()
    assert "injected deterministic failure" in str(state.result(raise_on_failure=False))
    rows = assert_all_destroyed(vast, 2)
    assert rows[0]["id"] == preempted[0]
    (train_result,) = glob.glob(str(runs / "**" / "train" / "result.json"), recursive=True)
    import json

    assert json.loads(Path(train_result).read_text())["metrics"]["resumed_from_step"] is not None
    steps = [r["step"] for r in cost_table(state)]
    assert "machine 1: total" in steps and "machine 2: total" in steps
    assert any(re.match(r"machine \d: bandwidth: ", s) for s in steps)
