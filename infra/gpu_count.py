"""machine.vast.num_gpus as offer filters: an exact count, or a range of counts (min..max, max optional).

A number keeps the old meaning (exactly that many GPUs); `{min, max}` lets offers with any count in the
range compete, ranked by their whole run's cost with N GPUs (infra/gpu_speed.py). `gpu_ram` (and so
`min_gpu_ram_gb`) is per GPU on Vast.ai: the training's memory is checked against one GPU, since each
rank holds the whole model and its micro-batch.
"""
from __future__ import annotations

from contract.machine_config import VastConfig


def gpu_filter(v: VastConfig) -> dict:
    """The /bundles/ condition on `num_gpus`."""
    lo, hi = v.gpu_range()
    if lo == hi:
        return {"eq": lo}
    return {"gte": lo} if hi is None else {"gte": lo, "lte": hi}


def gpu_count_fits(n: int, v: VastConfig) -> bool:
    lo, hi = v.gpu_range()
    return lo <= n and (hi is None or n <= hi)


def describe_gpu_count(v: VastConfig) -> str:
    lo, hi = v.gpu_range()
    if lo == hi:
        return f"= {lo} (machine.vast.num_gpus)"
    return f">= {lo} (machine.vast.num_gpus.min)" if hi is None else f"in {lo}..{hi} (machine.vast.num_gpus)"


def ranks_used(num_gpus: int, grad_accum: int) -> int:
    """The GPUs the train step trains on: each rank accumulates grad_accum / N micro-batches of the global
    batch, so it uses the largest N <= num_gpus that divides train.grad_accum (the others bill idle)."""
    return max((d for d in range(1, max(1, int(num_gpus)) + 1) if grad_accum % d == 0), default=1)
