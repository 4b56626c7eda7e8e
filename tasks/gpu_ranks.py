"""How many training ranks a machine runs, from the GPUs its setup counted.

`python -m steps.bootstrap` prints `GPUS {"nvidia_smi": N, "torch": M}`; `setup_environment` returns
those counts and the flow keeps them on the lease (`Lease.gpus_counted`) for the rest of that machine's
steps. On a GPU run (`machine.gpu: required`) the train step counts the GPUs torch sees itself and
starts one rank per GPU. On a CPU run (`machine.gpu: none`: the emulator, the demo) a machine whose
nvidia-smi lists N > 1 GPUs (the emulator's N-GPU offers) trains with N CPU processes (as many as
divide train.grad_accum, the GPU rule): home passes `--cpu-ranks N` to the train step, so the whole flow,
its budget, copies home and replacements run with N ranks offline; elsewhere `train.nproc` stands. The count is never part of a step's config hash: a
replacement machine with another count resumes the same run.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

from contract.config import RunConfig
from infra.gpu_count import ranks_used
from infra.machines.machine import Lease

MAX_GPUS = 64  # a count above this from a machine is not believed


def counted_gpus(line: dict) -> dict:
    """The GPU counts of the setup's GPUS line as small integers (nvidia-smi's, torch's); 0 when absent
    or not a count (the machine's word: never trusted to be sane)."""
    def count(key: str) -> int:
        v = line.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_GPUS else 0
    return {"nvidia_smi": count("nvidia_smi"), "torch": count("torch")}


def with_counted_gpus(lease: Lease, setup: Optional[dict]) -> Lease:
    """The lease with the GPUs its setup counted (nothing counted: unchanged)."""
    gpus = (setup or {}).get("gpus")
    return replace(lease, gpus_counted=dict(gpus)) if gpus else lease


def cpu_ranks(lease: Lease, cfg: RunConfig) -> Optional[int]:
    """The CPU processes the train step runs on this machine when home decides it (see the module
    docstring): one per listed GPU, as many as divide train.grad_accum (as on GPUs); else None."""
    listed = int((lease.gpus_counted or {}).get("nvidia_smi") or 0)
    if cfg.machine.gpu != "none" or listed < 2:
        return None
    n = ranks_used(listed, cfg.train.grad_accum)
    return n if n > 1 else None
