"""The qat flow on the emulator's 2-GPU offer (machine.gpu none: 2 CPU ranks, gloo): both ranks train,
one checkpoint stream comes home, the machine is destroyed. Real Prefect server, emulator, sshd."""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest


TWO_GPUS = {"machine.vast.gpu_names": ["RTX 4090"], "machine.vast.num_gpus": 2, "train.per_device_batch_size": 1,
            "train.grad_accum": 2, "train.max_steps": 20, "train.save_every": 2, "train.eval_every": 20,
            "machine.checkpoint_sync_every_s": 1}


def watch_checkpoints_home(runs: Path, stop: threading.Event, seen: dict) -> None:
    """Every checkpoint that lands at home while training runs (the final model replaces them): its files."""
    while not stop.is_set():
        for ckpt in runs.glob("tiny/*/work/train/checkpoints/step-*"):
            try:
                seen.setdefault(ckpt.name, set()).update(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*"))
            except (OSError, ValueError):  # replaced while read
                pass
        time.sleep(0.2)


@pytest.mark.slow
def test_a_2_gpu_offer_trains_on_2_ranks_and_one_checkpoint_stream_comes_home(prefect_server, emulated_vast):  # noqa: F811
    from flows.qat import qat

    stop, seen = threading.Event(), {}
    watcher = threading.Thread(target=watch_checkpoints_home, args=(Path(os.environ["QAT_RUNS_DIR"]), stop, seen))
    watcher.start()
    try:
        state = qat(config="tiny", overrides=TWO_GPUS, return_state=True)
    finally:
        stop.set()
        watcher.join()
    assert state.is_completed(), state.message
    flow_run_id = state.state_details.flow_run_id

    rented = [r for r in emulated_vast.ledger()["instances"] if r["label"].startswith("qat-")]
    assert [(r["gpu_name"], r["num_gpus"]) for r in rented] == [("RTX 4090", 2)]
    assert rented[0]["ended_at"] is not None  # destroyed (the fixture also checks nothing is left running)

    work = next((Path(os.environ["QAT_RUNS_DIR"]) / "tiny").glob(f"*-{flow_run_id}")) / "work"
    train = json.loads((work / "train" / "result.json").read_text())
    assert train["metrics"]["world_size"] == 2  # both ranks trained, rank 0 reported
    # One checkpoint stream came home while training ran: rank 0's step-<N> folders, one state each (it holds
    # every rank's RNG), nothing written per rank.
    assert seen, "no checkpoint came home during training"
    for name, files in seen.items():
        assert "state.pt" in files and not [f for f in files if "rank" in f], (name, sorted(files))
    assert not [p for p in (work / "train").rglob("*") if "rank" in p.name]
