"""Teardown under interruption, for real: a Prefect server, a Runner serving the qat flow (each run in
its own process, as under a worker), the Vast.ai emulator with real sshd instances, the tiny model.

A run is interrupted once training is running on the machine: cancelled from the API, SIGTERM or
SIGKILL of its flow process, or SIGKILL of the runner with it (a lost worker machine). Whatever
happens, its instance must end destroyed and the ledger show nothing live; which layer did it
(the flow's finally, the on_cancellation/on_crashed hook, or the reaper: the `reap` deployment served
by its own runner, as production runs it on its own work pool and worker) is recorded and checked.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

pytestmark = pytest.mark.slow

LONG = {"train.max_steps": 400, "train.save_every": 50, "train.eval_every": 400, "data.max_eval_samples": 2}
CASES = ("cancel", "sigterm", "sigkill-flow")


@pytest.fixture(scope="module")
def stack_options() -> dict:
    return {"runner_limit": 4}


def _interrupt(stack, case: str, run_id: str, out: dict) -> None:
    from benchmarks.chaos import _remote_train_started

    try:
        inst = _remote_train_started(stack, run_id, timeout=900)
        out["instance"] = inst["id"]
        out["interrupted_at"] = time.time()
        if case == "cancel":
            stack.cancel(run_id)
        else:
            pid = stack.flow_pid(run_id)
            assert pid, f"no flow process found for run {run_id}"
            os.kill(pid, signal.SIGTERM if case == "sigterm" else signal.SIGKILL)
        out["state"] = stack.wait_final(run_id, 600).type.value
        out["destroyed_within_s"] = _wait_gone(stack, run_id, out["interrupted_at"])
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"


def _wait_gone(stack, run_id: str, since: float, timeout: float = 120) -> float:
    from devtools.services import wait_for

    wait_for(lambda: stack.instances(run_id) and not stack.live(run_id), timeout, 1, f"instances of {run_id} to end")
    return round(max(i["ended_at"] for i in stack.instances(run_id)) - since, 1)


@pytest.fixture(scope="module")
def outcomes(stack, tmp_path_factory):
    """Interrupt three concurrent runs (cancel, SIGTERM, SIGKILL of the flow process), then a
    fourth whose runner dies with it; returns what happened to each."""
    from benchmarks.chaos import act_kill_all, teardown_layer

    results: dict[str, dict] = {}
    threads = []
    for case in CASES:
        run_id = stack.submit(overrides={**LONG, "name": f"td-{case}"})
        results[case] = {"run_id": run_id}
        t = threading.Thread(target=_interrupt, args=(stack, case, run_id, results[case]), daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join(timeout=1500)

    run_id = stack.submit(overrides={**LONG, "name": "td-kill-worker"})
    notes: dict = {}
    try:
        act_kill_all(stack, run_id, notes)
        results["kill-worker"] = {"run_id": run_id, "state": stack.state(run_id).type.value, **notes,
                                  "destroyed_within_s": _wait_gone(stack, run_id, notes["killed_at"])}
    except Exception as e:
        results["kill-worker"] = {"run_id": run_id, "error": f"{type(e).__name__}: {e}", **notes}
    for case, r in results.items():
        if "error" not in r:
            r["layer"] = teardown_layer(stack, r["run_id"], stack.instances(r["run_id"]), r)
        r["live"] = [i["id"] for i in stack.live(r["run_id"])]
    report = tmp_path_factory.getbasetemp() / "teardown-layers.json"
    report.write_text(json.dumps(results, indent=1, default=str))
    print("\nteardown layers:", json.dumps({c: (r.get("state"), r.get("layer"), r.get("destroyed_within_s"))
                                           for c, r in results.items()}))
    return results


@pytest.mark.parametrize("case,states", [("cancel", {"CANCELLED"}), ("sigterm", {"CRASHED", "FAILED", "CANCELLED"}),
                                         ("sigkill-flow", {"CRASHED"})])
def test_interrupted_run_destroys_its_machine_without_the_reaper(outcomes, case, states):
    r = outcomes[case]
    assert "error" not in r, r
    assert r["state"] in states, r
    assert r["live"] == [], r
    assert r["layer"] != "reaper" and not r["layer"].startswith("unknown"), r  # destroyed by the run's own layers


def test_lost_worker_is_reaped(outcomes, stack):
    """SIGKILL of runner + flow: nothing fires, the run stays Running. The reaper, deployed and served
    by its own runner (which the kill spares, as its own worker would be), sees no heartbeat for 3
    intervals (30 s minimum each), judges the run gone, and destroys the instance on its next check."""
    r = outcomes["kill-worker"]
    assert "error" not in r, r
    assert r["state"] == "RUNNING", r  # nobody was left to report the crash
    assert r["layer"] == "reaper" and r["live"] == [], r
    assert r["judged_dead_after_s"] >= 60, r  # not before its heartbeats went silent for the rule's intervals
    assert r["checks_gone_before_destroy"] == 2, r  # never on the first "gone" verdict
    assert not r.get("reaper_failures"), r
    assert stack.reaper is not None and stack.reaper.alive()
