"""The train step on 2 gloo processes (torchrun + DDP, steps/distributed.py), tiny random Whisper, CPU.

Every 2-process run is the product's own command, `python -m steps train --config F --workdir D`,
which starts torchrun itself (train.nproc 2, machine.gpu none)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from contract.config import parse_config
from steps import train
from train_runs import context, history, make_prepared

ROOT = Path(__file__).resolve().parents[1]
# 6 optimizer steps of a global batch of 2 x 4 over 6 clips: epochs cross optimizer steps, the
# last micro-batch of each epoch is short (6 = 2 + 2 + 2; with 5 clips 2 + 2 + 1).
CFG = dict(max_steps=6, per_device_batch_size=2, grad_accum=4, save_every=2, eval_every=3, warmup_steps=1,
           gradient_checkpointing=True)


def write_config(d: Path, **train_cfg) -> Path:
    ctx = context(d, **train_cfg)
    raw = json.loads(ctx.cfg.model_dump_json())
    raw["machine"] = {**raw["machine"], "gpu": "none", "backend": "local"}
    raw["machine"]["vast"].pop("workload", None)
    p = d / "run.yaml"
    p.write_text(parse_config(raw).to_yaml())
    return p


def steps_train(d: Path, *extra: str, kill_at: int | None = None, **train_cfg) -> tuple[int, str]:
    """Run `python -m steps train` on workdir d; with kill_at, kill every process of it (SIGKILL to the
    group, like a lost machine) once rank 0 reports that optimizer step. Returns (exit code, stdout)."""
    cfg = write_config(d, **train_cfg)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "steps", "train", "--config", str(cfg), "--workdir", str(d), *extra],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
    out = []
    for line in p.stdout:
        out.append(line)
        if kill_at and line.startswith("PROGRESS ") and json.loads(line[9:])["done"] == kill_at:
            os.killpg(p.pid, signal.SIGKILL)
            break
    p.stdout.close()
    return p.wait(timeout=600), "".join(out)


def weights(d: Path) -> dict:
    return load_file(d / "train/model/model.safetensors")


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The uninterrupted 2-process run."""
    d = tmp_path_factory.mktemp("two")
    make_prepared(d, n_train=6, n_dev=2)
    rc, out = steps_train(d, nproc=2, **CFG)
    assert rc == 0, out
    return d, out


def test_two_processes_train_to_the_weights_of_one_with_the_same_global_batch(two_processes, tmp_path):
    d2, out = two_processes
    result = json.loads((d2 / "train/result.json").read_text())["metrics"]
    assert result["world_size"] == 2 and result["optimizer_steps"] == 6
    # one voice: rank 0's PROGRESS lines only, one per optimizer step; one history, one checkpoint stream
    assert [json.loads(l[9:])["done"] for l in out.splitlines() if l.startswith("PROGRESS ")] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in (d2 / "train/checkpoints").iterdir()) == ["step-2", "step-4"]
    assert torch.load(d2 / "train/checkpoints/step-4/state.pt", weights_only=False)["world_size"] == 2

    make_prepared(tmp_path, n_train=6, n_dev=2)
    one = train.run(context(tmp_path, **CFG))
    assert one["world_size"] == 1
    h1, h2 = history(context(tmp_path, **CFG)), history(context(d2, **CFG))
    assert [r["step"] for r in h1] == [r["step"] for r in h2]
    l1, l2 = [r["loss"] for r in h1 if "loss" in r], [r["loss"] for r in h2 if "loss" in r]
    assert l1[0] == pytest.approx(l2[0], rel=1e-6)  # the same 8 samples, the same start: one step apart by rounding
    assert l1 == pytest.approx(l2, rel=1e-4)
    assert off_course(weights(tmp_path), weights(d2)) < TOLERANCE


def untimed(d: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history(context(d, **CFG))]


def off_course(a: dict, b: dict) -> float:
    """|a - b| / |a - start| over every weight: how far two runs ended apart, relative to how far training moved."""
    from steps.models import load_model

    start = load_model("fixture:tiny-random").state_dict()
    assert a.keys() == b.keys() <= start.keys()
    apart = sum(float((a[k] - b[k]).double().pow(2).sum()) for k in a) ** 0.5
    moved = sum(float((a[k] - start[k]).double().pow(2).sum()) for k in a) ** 0.5
    print(f"runs apart {apart:.3g}, training moved {moved:.3g}: ratio {apart / moved:.3g}")
    return apart / moved


# The same samples in every optimizer step, summed in another order (per rank, then the all-reduce):
# float32 rounding, which AdamW's normalized update can turn into a fraction of a step on weights
# whose gradient is near zero; a different data order or a rank reading the wrong shard ends far outside it.
TOLERANCE = 0.01


def test_a_killed_and_resumed_two_process_run_equals_the_uninterrupted_one(two_processes, tmp_path):
    """Bit for bit: 2 gloo ranks sum in a fixed order and a checkpoint restores weights, AdamW moments,
    schedule, each rank's RNG and the global data position. Resumed on 1 process (a replacement machine
    with fewer GPUs) it continues the same global batch and data order, re-sharded: within TOLERANCE."""
    d2, _ = two_processes
    killed = tmp_path / "killed"
    make_prepared(killed, n_train=6, n_dev=2)
    rc, out = steps_train(killed, kill_at=3, nproc=2, **CFG)
    assert rc == -signal.SIGKILL and not (killed / "train/result.json").exists(), out
    assert "step-2" in [p.name for p in (killed / "train/checkpoints").iterdir()]
    fewer = tmp_path / "fewer"
    shutil.copytree(killed, fewer)

    rc, out = steps_train(killed, "--resume", nproc=2, **CFG)
    assert rc == 0, out
    m = json.loads((killed / "train/result.json").read_text())["metrics"]
    assert m["resumed_from_step"] in (2, 4) and m["world_size"] == 2 and m["optimizer_steps"] == 6
    a, b = weights(d2), weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert untimed(killed) == untimed(d2)  # losses, learning rates, gradient norms, dev loss and WER

    m1 = train.run(context(fewer, resume=True, **CFG))  # nproc 1: not part of the config hash, the checkpoint is resumed
    assert m1["resumed_from_step"] == m["resumed_from_step"] and m1["world_size"] == 1
    assert off_course(weights(d2), weights(fewer)) < TOLERANCE


def test_a_rank_that_fails_fails_the_step_with_its_own_classification_naming_it(tmp_path):
    """A clip only rank 1 reads (in its first micro-batch) holds a token id past the vocabulary: rank 1
    fails, the step reports rank 1's error as one process reports it, and no rank is left running."""
    from datasets import load_from_disk

    from steps.train import MicroBatches

    reports = {}
    for n in (1, 2):
        d = tmp_path / f"n{n}"
        make_prepared(d, n_train=6, n_dev=2)
        bad = MicroBatches(6, CFG["per_device_batch_size"], 42).indices(2)[0]  # rank 1's first micro-batch
        ds = load_from_disk(str(d / "prepare/train"))
        ds = ds.map(lambda row, i: {"labels": [10**6] if i == bad else row["labels"]}, with_indices=True)
        ds.save_to_disk(str(d / "prepare/train-bad"))
        shutil.rmtree(d / "prepare/train")
        (d / "prepare/train-bad").rename(d / "prepare/train")
        rc, out = steps_train(d, nproc=n, **CFG)
        errors = [json.loads(l[len("STEP_ERROR "):]) for l in out.splitlines() if l.startswith("STEP_ERROR ")]
        assert len(errors) == 1, out
        reports[n] = rc, errors[0], json.loads((d / "train/error.json").read_text())
    (rc1, one, _), (rc2, two, two_file) = reports[1], reports[2]
    assert rc2 == rc1 and two == two_file
    assert two["type"] == one["type"] and two["retryable"] == one["retryable"] and two["rank"] == 1
    assert two["message"] == f"rank 1 of 2: {one['message']}"


@pytest.mark.slow
def test_ddp_wraps_the_prepared_model_with_compiled_blocks(two_processes, tmp_path):
    """The order that works: freeze, fake quantizers, gradient checkpointing, compile each block, then DDP
    around the model (steps/train_loop.py Trainer): 2 compiled ranks train as the 2 eager ones did."""
    d2, _ = two_processes
    make_prepared(tmp_path, n_train=6, n_dev=2)
    rc, out = steps_train(tmp_path, nproc=2, compile=True, **CFG)
    assert rc == 0, out
    m = json.loads((tmp_path / "train/result.json").read_text())["metrics"]
    assert m["compiled"] is True and m["world_size"] == 2
    assert off_course(weights(d2), weights(tmp_path)) < TOLERANCE


def test_a_process_count_that_does_not_divide_grad_accum_is_refused_before_renting():
    from contract.config import ConfigError
    from contract.result_file import config_hash

    base = {"name": "t", "model": {"name_or_path": "fixture:tiny-random"}, "data": {"source": "hf", "dataset": "none"},
            "quant": {"scheme": "int8"}}
    with pytest.raises(ConfigError, match=r"train.grad_accum 4 is not a multiple of train.nproc 3"):
        parse_config({**base, "train": {"grad_accum": 4, "nproc": 3}, "machine": {"gpu": "none"}})
    with pytest.raises(ConfigError, match=r"train.grad_accum 4 is not a multiple of machine.vast.num_gpus 8"):
        parse_config({**base, "train": {"grad_accum": 4}, "machine": {"vast": {"num_gpus": 8}}})
    two, one = (parse_config({**base, "train": {"grad_accum": 4, "nproc": n}, "machine": {"gpu": "none"}}) for n in (2, 1))
    assert config_hash(two, "train") == config_hash(one, "train")  # how many processes train is not what is trained
