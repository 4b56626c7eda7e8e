"""`python -m benchmarks.gpu_probe --nproc N`: samples/s on N ranks and the scaling efficiency.

The probe first runs its modes in one process, then starts itself under torchrun
(`python -m torch.distributed.run --standalone --nproc-per-node N`): each rank wraps the train step's
own Trainer model in DistributedDataParallel (NCCL on GPUs, one GPU per rank; gloo on a CPU) and times
the same micro-batch. Samples/s on N ranks = N x micro-batch x steps / rank 0's time (every step ends
in an all-reduce, so the ranks move together); efficiency = that / (N x the one-process samples/s).
infra/gpu_scaling.csv keeps one efficiency per GPU count: `--record` writes the measured one there
(GPU runs only; on a CPU the ranks share the cores, so the figure says nothing about GPUs). Every
process, the one-process run included, uses OMP_NUM_THREADS CPU threads (torchrun's default: 1).
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCALING_TABLE = REPO / "infra" / "gpu_scaling.csv"
COLLECTIVE_TIMEOUT_S = 600  # a rank that never joins fails the probe instead of hanging it


def in_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_rank():
    """This process's rank under torchrun: (rank, world size), the process group initialised and, on a
    GPU machine, this rank's GPU made current."""
    import torch
    import torch.distributed as dist

    local = int(os.environ["LOCAL_RANK"])
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    return dist.get_rank(), dist.get_world_size()


def same_threads_as_ranks() -> None:
    """The one-process run uses the CPU threads each rank gets (OMP_NUM_THREADS, torchrun's default 1)."""
    import torch

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def launch(argv: list[str], nproc: int, out: Path) -> int:
    """Run the probe with `argv` on `nproc` ranks under torchrun; rank 0 writes `out`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "benchmarks.gpu_probe", *argv, "--out", str(out)]
    print("running:", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=REPO).returncode


def scaling(one: dict, many: dict, nproc: int) -> dict:
    """Per mode: samples/s of one process and of `nproc` ranks, and the efficiency."""
    out = {}
    for mode, r in many.items():
        base = (one.get(mode) or {}).get("samples_per_s")
        sps = r.get("samples_per_s")
        out[mode] = {"nproc": nproc, "samples_per_s": sps, "one_process_samples_per_s": base,
                     "efficiency": round(sps / (nproc * base), 3) if sps and base else None}
    return out


def run_scaling(argv: list[str], nproc: int, one_report: dict) -> dict:
    """The N-rank run of the same probe, and the scaling of each mode against `one_report`."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ranks.json"
        code = launch(argv, nproc, out)
        if code != 0 or not out.is_file():
            raise SystemExit(f"the {nproc}-rank probe failed (exit {code}): see its output above")
        many = json.loads(out.read_text())
    return {"nproc": nproc, "ranks": many, "scaling": scaling(one_report["results"], many["results"], nproc)}


def record(table: Path, nproc: int, efficiency: float, source: str) -> None:
    """Write the measured efficiency of `nproc` GPUs into the scaling table (replacing that count's row)."""
    rows = [r for r in csv.DictReader(table.open()) if int(r["num_gpus"]) != nproc]
    rows.append({"num_gpus": str(nproc), "efficiency": f"{efficiency:g}", "source": source})
    rows.sort(key=lambda r: int(r["num_gpus"]))
    with table.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["num_gpus", "efficiency", "source"], lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
