"""Dollars per training sample: how fast each GPU trains our model, and offers ranked by it.

Two tables next to this module (sources in docs/REFERENCE.md, "GPU throughput table"):

* gpu_speed.csv: per Vast.ai `gpu_name`, its dense bf16 tensor peak (TFLOP/s) and memory.
* train_throughput.csv: training samples/s and peak memory measured on a reference GPU (H200) at
  whisper-large-v3-distil-fr shapes, per (scheme, compile, checkpointing, micro-batch).

Expected samples/s of a workload on GPU X: the measured figure when X is the GPU it was measured
on, else that figure times X's bf16 peak over the reference's (a FLOP-scaled estimate, marked as
such: training here is ~98 % dense matmuls, but memory bandwidth and kernel efficiency differ).
Peak memory does not depend on the GPU; an offer whose memory is short of it (plus 10 %) is left out.

On an offer with N GPUs the train step runs N ranks (torchrun + DDP), each with the whole model and its
own micro-batch: memory is checked per GPU (`gpu_ram`), and the expected samples/s is N x the per-GPU
figure x a scaling efficiency from gpu_scaling.csv (the row of the largest count <= N; estimates are
marked as such there until `python -m benchmarks.gpu_probe --nproc N` measured them). N is the GPUs the
train step uses: the largest count <= the offer's that divides train.grad_accum (infra/gpu_count.py
ranks_used); an 8-GPU offer with grad_accum 4 trains on 4 and bills 8.
"""
from __future__ import annotations

import csv
from functools import lru_cache
from pathlib import Path
from typing import Optional

from contract.machine_config import TrainWorkload

from .gpu_count import ranks_used

HERE = Path(__file__).resolve().parent
VRAM_MARGIN = 1.10  # allocator fragmentation, CUDA context


@lru_cache(maxsize=None)
def gpus() -> dict[str, dict]:
    return {r["gpu_name"].upper(): {**r, "bf16_tflops": float(r["bf16_tflops"])}
            for r in csv.DictReader((HERE / "gpu_speed.csv").open())}


@lru_cache(maxsize=None)
def _measured() -> tuple[dict, ...]:
    return tuple({**r, "compile": r["compile"] == "true", "gradient_checkpointing": r["gradient_checkpointing"] == "true",
                  "micro_batch": int(r["micro_batch"]), "samples_per_s": float(r["samples_per_s"]),
                  "peak_gib": float(r["peak_gib"])}
                 for r in csv.DictReader((HERE / "train_throughput.csv").open()))


def reference_speed(scheme: str, micro_batch: int, compile: bool, gradient_checkpointing: bool = True) -> Optional[dict]:
    """The measured row closest to the workload (same scheme, compile and checkpointing; the nearest
    micro-batch) and the peak memory at `micro_batch` (linear through the two nearest measured
    micro-batches; from one, scaled up with the batch). None when nothing of that kind was measured."""
    rows = [r for r in _measured() if (r["scheme"], r["compile"], r["gradient_checkpointing"])
            == (scheme, compile, gradient_checkpointing)]
    if not rows:
        return None
    rows.sort(key=lambda r: (abs(r["micro_batch"] - micro_batch), -r["micro_batch"]))
    best = rows[0]
    if best["micro_batch"] == micro_batch:
        peak = best["peak_gib"]
    elif len(rows) > 1 and rows[1]["micro_batch"] != best["micro_batch"]:
        a, b = rows[0], rows[1]
        slope = (b["peak_gib"] - a["peak_gib"]) / (b["micro_batch"] - a["micro_batch"])
        peak = max(a["peak_gib"], b["peak_gib"]) if slope < 0 else a["peak_gib"] + slope * (micro_batch - a["micro_batch"])
    else:
        peak = best["peak_gib"] * max(1.0, micro_batch / best["micro_batch"])
    note = "" if best["micro_batch"] == micro_batch else f", nearest measured micro-batch {best['micro_batch']}"
    return {"gpu_name": best["gpu_name"], "samples_per_s": best["samples_per_s"], "peak_gib": round(peak, 2),
            "source": best["source"] + note}


@lru_cache(maxsize=None)
def _scaling() -> tuple[dict, ...]:
    rows = [{**r, "num_gpus": int(r["num_gpus"]), "efficiency": float(r["efficiency"])}
            for r in csv.DictReader((HERE / "gpu_scaling.csv").open())]
    return tuple(sorted(rows, key=lambda r: r["num_gpus"]))


def scaling(num_gpus: int) -> dict:
    """The scaling efficiency of `num_gpus` ranks (the table's row of the largest count <= num_gpus)."""
    rows = [r for r in _scaling() if r["num_gpus"] <= max(1, int(num_gpus))]
    return rows[-1]


def expected_speed(gpu_name: str, w: TrainWorkload, num_gpus: int = 1) -> Optional[dict]:
    """Expected samples/s of workload `w` on `num_gpus` x `gpu_name`, with its source; None when unknown.
    `per_gpu_samples_per_s` is one GPU's figure; `samples_per_s` = it x num_gpus x the scaling efficiency."""
    ref = reference_speed(w.scheme, w.micro_batch, w.compile, w.gradient_checkpointing)
    gpu = gpus().get(str(gpu_name).upper())
    if ref is None or gpu is None:
        return None
    if gpu["gpu_name"].upper() == ref["gpu_name"].upper():
        one = {"samples_per_s": ref["samples_per_s"], "peak_gib": ref["peak_gib"], "source": ref["source"]}
    else:
        base = gpus()[ref["gpu_name"].upper()]
        sps = ref["samples_per_s"] * gpu["bf16_tflops"] / base["bf16_tflops"]
        one = {"samples_per_s": round(sps, 2), "peak_gib": ref["peak_gib"],
               "source": f"estimate: {ref['gpu_name']} measured x bf16 peak {gpu['bf16_tflops']:g}/{base['bf16_tflops']:g}"}
    n = max(1, int(num_gpus or 1))
    out = {**one, "per_gpu_samples_per_s": one["samples_per_s"], "num_gpus": n, "scaling": 1.0}
    if n == 1:
        return out
    eff = scaling(n)
    out.update(samples_per_s=round(one["samples_per_s"] * n * eff["efficiency"], 2), scaling=eff["efficiency"])
    marked = eff["source"].startswith("estimate") and not one["source"].startswith("estimate")
    out["source"] = (("estimate: " if marked else "") + f"{one['source']}; x {n} GPUs x scaling "
                     f"{eff['efficiency']:g} ({eff['source']})")
    return out


def vram_needed_mb(w: TrainWorkload) -> Optional[float]:
    ref = reference_speed(w.scheme, w.micro_batch, w.compile, w.gradient_checkpointing)
    return None if ref is None else ref["peak_gib"] * 2**30 / 1e6 * VRAM_MARGIN


def rank_offers(offers: list[dict], w: Optional[TrainWorkload]) -> list[dict]:
    """Offers cheapest per run first: every step's hours at `dph_total` plus the run's expected bytes at
    the offer's `inet_down_cost` / `inet_up_cost` (infra/run_estimate.py); GPUs of unknown speed after
    them, by $/h; offers without the memory the micro-batch needs (per GPU) are left out. Without a workload: by
    $/h alone. Each ranked offer gains `expected_samples_per_s`, `usd_per_sample` (the GPU's $ per
    training sample), `expected_usd` (the run) and `speed_source` (None where unknown)."""
    from .run_estimate import ClockRefused, step_rows

    if w is None:
        return sorted(offers, key=lambda o: float(o["dph_total"]))
    need = vram_needed_mb(w)
    ranked = []
    for o in offers:
        if need is not None and float(o.get("gpu_ram") or 0) < need:
            continue
        speed = expected_speed(o.get("gpu_name", ""), w, ranks_used(int(o.get("num_gpus") or 1), w.grad_accum))
        sps = speed["samples_per_s"] if speed else None
        try:
            rows = step_rows(o, w, setup_hours=0.0)
        except ClockRefused:
            rows = None
        ranked.append({**o, "expected_samples_per_s": sps, "speed_source": speed["source"] if speed else None,
                       "usd_per_sample": float(o["dph_total"]) / 3600 / sps if sps else None,
                       "expected_usd": round(sum(r["usd"] for r in rows), 4) if rows else None})
    return sorted(ranked, key=lambda o: (0, o["expected_usd"]) if o["expected_usd"] is not None else
                  (1, o["usd_per_sample"]) if o["usd_per_sample"] is not None else (2, float(o["dph_total"])))
