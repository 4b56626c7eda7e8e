"""Training on every GPU (or on N CPU processes): PyTorch's torchrun and DistributedDataParallel.

Launch: `python -m steps train ...` counts the processes N (`world_size_for`): the GPUs torch sees
when machine.gpu is required, train.nproc otherwise (CPU processes, gloo). N = 1 runs the step in
this process as before. N > 1 runs `python -m torch.distributed.run --standalone --nproc-per-node N
-m steps train <same arguments>` as a child (`launch`): every rank inherits this process's stdout
and stderr, rank 0 alone prints the log and PROGRESS lines and writes checkpoints, history and
result.json (steps/common.py, steps/train.py). A rank that fails records its classified error in
<step dir>/error-rank<R>.json; the first one to fail is the cause (the others fail after it, when a
collective loses it, or are stopped by torchrun) and becomes the step's one STEP_ERROR line,
error.json and exit code, its message naming the rank.

Data: the run's micro-batches form one global stream, a function of (seed, epoch) alone
(steps/train.py MicroBatches). Optimizer step s takes micro-batches s*A .. s*A+A-1, A =
train.grad_accum, and rank r of N takes the r-th contiguous A/N of them (`rank_micro_batches`):
each process accumulates A/N micro-batches, so the global batch is per_device_batch_size x A
whatever N is, and a run resumed with another N continues the same data order, re-sharded.

Collectives time out after COLLECTIVE_TIMEOUT (no rank waits forever on a lost peer); it bounds
rank 0's evaluation too, which the other ranks wait for in their next collective.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Iterator

from contract.catalogue import ERROR_PREFIX, EXIT_DETERMINISTIC, EXIT_OK, EXIT_RETRYABLE

COLLECTIVE_TIMEOUT = timedelta(minutes=30)
RANK_ERROR = "error-rank{rank}.json"


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def world_size_for(cfg, log=print) -> int:
    """How many processes train: the GPUs torch sees when machine.gpu is required, train.nproc otherwise.
    A GPU count that does not divide train.grad_accum uses its largest divisor (said in the log)."""
    if cfg.machine.gpu != "required":
        return cfg.train.nproc
    import torch

    gpus = torch.cuda.device_count()
    n = max([d for d in range(1, gpus + 1) if cfg.train.grad_accum % d == 0], default=1)
    if n < gpus:
        log(f"[train] {gpus} GPUs but train.grad_accum {cfg.train.grad_accum} is not a multiple of {gpus}: training on "
            f"{n} of them (set grad_accum to a multiple of {gpus} to use all)")
    return n


def launch(argv: list[str], n: int, step_dir: Path) -> int:
    """Run `python -m steps <argv>` as n processes under torchrun; return the step's exit code."""
    step_dir.mkdir(parents=True, exist_ok=True)
    for old in step_dir.glob(RANK_ERROR.format(rank="*")):
        old.unlink()
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    child = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                              "-m", "steps", *argv], env=env)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # stopping this process stops every rank
        signal.signal(sig, lambda s, _f: child.send_signal(s))
    rc = child.wait()
    if rc == 0:
        return EXIT_OK
    failures = []
    for p in step_dir.glob(RANK_ERROR.format(rank="*")):
        try:
            failures.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            pass
    if failures:
        err = min(failures, key=lambda e: e["time"])
        err.pop("time")
    else:  # killed without a word (the kernel's OOM killer, a signal): torchrun's summary above names the rank
        err = {"step": argv[0], "type": "ChildFailedError", "retryable": True,
               "message": f"a training process ended without reporting an error (torchrun exit code {rc}; its "
                          "summary on stderr names the rank and its exit code or signal)"}
    from contract.result_file import ERROR_FILE, write_json_atomic

    try:
        write_json_atomic(step_dir / ERROR_FILE, err)
    except OSError:
        pass
    print(ERROR_PREFIX + json.dumps(err), flush=True)
    return EXIT_RETRYABLE if err["retryable"] else EXIT_DETERMINISTIC


def record_failure(step_dir: Path, err: dict) -> dict:
    """This rank's classified error, named and timed, into <step dir>/error-rank<R>.json for `launch`."""
    err = {**err, "message": f"rank {rank()} of {world_size()}: {err['message']}", "rank": rank(), "time": time.time()}
    try:
        (step_dir / RANK_ERROR.format(rank=rank())).write_text(json.dumps(err))
    except OSError:
        pass
    return err


# ---------------------------------------------------------------- inside a rank

def init() -> None:
    """Join the process group (NCCL on GPUs, gloo on CPU) when started by torchrun with N > 1."""
    import torch
    import torch.distributed as dist

    if world_size() == 1 or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=COLLECTIVE_TIMEOUT)


def active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def wrap(model, device):
    """DDP around a prepared model (frozen parts, fake quantizers, checkpointing, compiled blocks
    already in place: DDP sees the parameters that train); the model itself when not distributed."""
    if not active():
        return model
    import torch
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[torch.cuda.current_device()] if device.type == "cuda" else None)


def sum_over_ranks(*values: float) -> list[float]:
    """The values summed over every rank (the values themselves when not distributed)."""
    if not active():
        return list(values)
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def from_rank0(obj):
    """Rank 0's obj on every rank."""
    if not active():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj) -> list:
    """Every rank's obj, in rank order, on every rank."""
    if not active():
        return [obj]
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def rank_micro_batches(first_step: int, total_steps: int, accum: int) -> Iterator[int]:
    """This rank's global micro-batch numbers from optimizer step first_step to total_steps."""
    per_rank = accum // world_size()
    for s in range(first_step, total_steps):
        start = s * accum + rank() * per_rank
        yield from range(start, start + per_rank)


def finish() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
