"""The pre-rent estimate of a run on one offer, and the clock of its train step.

`estimate(offer, w, ...)` is a small table, one row per step (prepare, train, convert, bench,
evaluate) plus set-up: each row's hours, the machine's dollars for them, the bytes it downloads
(priced at the offer's `inet_down_cost`) and the bytes it copies home (`inet_up_cost`: checkpoints
during training, the model, the exports), and their sum. Offers are ranked by that sum
(infra/gpu_speed.py), so a cheap $/h with a high $/GB is not the cheapest run.

`clock(w, samples_per_s, ...)` derives, from the throughput expected on the rented GPU, the train
step's timeout (the expected time x TIMEOUT_MARGIN, never below machine.step_timeout_s: a timeout
never cuts a healthy run) and its checkpoint cadence (train.save_every lowered so that a checkpoint
is at most MAX_CHECKPOINT_AGE_S of training old: a retry loses at most that, plus one copy-home
interval when the machine is lost); a run the reaper would destroy by age is refused with the numbers.

Figures are marked: `measured` ones come from the files named; `assumed` ones are guesses to replace
with a measurement (docs/REFERENCE.md section 1d has the measured ones).
"""
from __future__ import annotations

import math
from typing import Optional

from contract import catalogue, disk
from contract.machine_config import MODEL_PARAMS, REAPER_MAX_AGE_HOURS, TrainWorkload

from .gpu_count import ranks_used
from .gpu_speed import expected_speed

MAX_CHECKPOINT_AGE_S = 1800.0  # a retry never loses more than 30 min of training
TIMEOUT_MARGIN = 1.5  # a healthy train step may run this much slower than expected
# Bytes follow from the sizes measured at the real shapes, which contract/disk.py owns (with their sources):
# the fp32 model per parameter, a checkpoint and convert's exports from it, a downloaded row.
REAL_PARAMS = MODEL_PARAMS[disk.REAL_MODEL]  # the shapes the per-step figures below were measured at
MODEL_BYTES_PER_PARAM = disk.MODEL_BYTES[disk.REAL_MODEL] / REAL_PARAMS
# A Hub dataset row downloaded: the average clip as 16-bit 16 kHz PCM (the parquet holds compressed audio:
# an upper bound).
DOWNLOAD_BYTES_PER_ROW = int(disk.PCM_BYTES_PER_SECOND * disk.HUB_AVG_CLIP_S)
SMALL_OUTPUTS = 64 * 10**6  # assumed: what prepare, bench and evaluate send home (JSON, CSV, tokenizer files)
# Seconds at the real shapes, measured on 2 CPU cores: the convert step, both models exported and quantized
# (benchmarks/real_scale.json, steps.convert_<scheme>.seconds); ONNX Runtime's kernel time of one encoder pass
# per 30 s clip, fp32 and quantized (the reference's real-scale section; evaluate and bench run 2 fp32 + 2
# quantized ONNX variants).
CONVERT_S = {"int8": 423.1, "int4": 228.8}
ENCODER_S = {"fp32": 6.4, "int8": 3.0, "int4": 7.3}
PREPARE_S_PER_ROW = 0.05  # assumed: decode + log-mel of one clip on the machine's CPU
STEPS = ("set-up", *catalogue.STEPS)  # the rows, in order: a step without a row below is an error, not a silent $0


class ClockRefused(ValueError):
    """The run cannot fit the clock (e.g. the reaper's age limit): the message has the numbers."""

    retryable = False


def clock(w: TrainWorkload, samples_per_s: float, step_timeout_s: float, gpu: str = "the GPU") -> dict:
    """The train step's timeout and checkpoint cadence on a GPU training at `samples_per_s`:
    timeout_s >= expected seconds x TIMEOUT_MARGIN (at least step_timeout_s); save_every (optimizer
    steps) <= train.save_every and small enough that a checkpoint is at most MAX_CHECKPOINT_AGE_S old.
    Raises ClockRefused, with the numbers, when the step would outlive the reaper's age limit."""
    if not samples_per_s or samples_per_s <= 0:
        raise ValueError("samples_per_s must be positive")
    expected_s = (w.samples or 0) / samples_per_s
    timeout_s = max(float(step_timeout_s), expected_s * TIMEOUT_MARGIN)
    per_step_s = w.samples_per_step / samples_per_s
    save_every = max(1, min(w.save_every, math.floor(MAX_CHECKPOINT_AGE_S / per_step_s)))
    if timeout_s > REAPER_MAX_AGE_HOURS * 3600:
        raise ClockRefused(
            f"training {w.samples} samples at {samples_per_s:g} samples/s on {gpu} is expected to take "
            f"{expected_s / 3600:.1f} h; with a {TIMEOUT_MARGIN:g}x margin the train step needs {timeout_s / 3600:.1f} h, "
            f"past the reaper's {REAPER_MAX_AGE_HOURS:g} h age limit: train on fewer samples (train.epochs, "
            "data.max_samples) or rent a faster GPU (machine.vast.gpu_names)")
    return {"expected_s": round(expected_s, 1), "timeout_s": round(timeout_s, 1), "save_every": save_every,
            "checkpoint_age_s": round(save_every * per_step_s, 1)}


def _gpus(offer: dict, w: TrainWorkload) -> int:
    return ranks_used(int(offer.get("num_gpus") or 1), w.grad_accum)


def _per_gb(offer: dict, field: str) -> float:
    return float(offer.get(field) or 0.0)


def _priced_scheme(w: TrainWorkload) -> str:
    """The scheme whose measured figures price `w`: its own, or int8's for a plain (unquantized) workload."""
    return w.scheme if w.scheme in disk.EXPORT_RATIO else "int8"


def _sizes(w: TrainWorkload) -> dict[str, float]:
    """Bytes of the fp32 model, one checkpoint and convert's exports of `w`'s model (0 when its size is unknown)."""
    model = MODEL_BYTES_PER_PARAM * (w.params or 0)
    return {"model": model, "checkpoint": disk.checkpoint_bytes(model, w.optimizer),
            "exports": disk.export_bytes(model, _priced_scheme(w))}


def step_rows(offer: dict, w: Optional[TrainWorkload], setup_hours: float,
              step_timeout_s: float = 6 * 3600) -> Optional[list[dict]]:
    """The estimate's rows on `offer` (see the module docstring); None when the training speed or the
    run's size is unknown (then only $/h x planned hours can be said)."""
    speed = expected_speed(offer.get("gpu_name", ""), w, _gpus(offer, w)) if w is not None else None
    if w is None or not w.samples or speed is None:
        return None
    sps, dph = speed["samples_per_s"], float(offer["dph_total"])
    down, up = _per_gb(offer, "inet_down_cost"), _per_gb(offer, "inet_up_cost")
    clk = clock(w, sps, step_timeout_s, str(offer.get("gpu_name")))
    p, scale = w.params, (w.params or 0) / REAL_PARAMS
    known = p is not None
    train_s = clk["expected_s"]
    copies = math.ceil(train_s / max(clk["checkpoint_age_s"], w.sync_every_s)) if known else 0
    size, scheme = _sizes(w), _priced_scheme(w)
    model = size["model"]
    onnx_clip = (2 * ENCODER_S["fp32"] + 2 * ENCODER_S[scheme]) * scale
    rows = {  # step: (seconds, bytes down, bytes home, basis)
        "set-up": (setup_hours * 3600, 0, 0, "machine.setup_hours: boot, push, the venv"),
        "prepare": (w.prepare_rows * PREPARE_S_PER_ROW, w.download_rows * DOWNLOAD_BYTES_PER_ROW + model,
         SMALL_OUTPUTS, f"{w.prepare_rows} rows x {PREPARE_S_PER_ROW:g} s (assumed); downloads the dataset and model"),
        "train": (train_s, 0, copies * size["checkpoint"] + model,
         f"{w.samples} samples at {sps:g} samples/s ({speed['source']}); {copies} checkpoint(s) copied home"),
        "convert": (CONVERT_S[scheme] * scale, 0, size["exports"],
         "2 models exported and quantized (measured on 2 cores)"),
        "bench": (w.bench_clips * onnx_clip, 0, SMALL_OUTPUTS, f"{w.bench_clips} clips x 4 ONNX variants on the CPU"),
        "evaluate": (w.eval_clips * onnx_clip, 0, SMALL_OUTPUTS,
         f"{w.eval_clips} clips x 4 ONNX variants on the CPU (an upper bound: on a GPU, eval.quantized_on auto "
         "scores the variants' PyTorch twins there and checks the exports on a few clips)"),
    }
    if set(rows) != set(STEPS):
        raise RuntimeError(f"infra/run_estimate.py estimates {sorted(rows)}, the steps are {list(STEPS)}: "
                           "give every step of contract/catalogue.py a row")
    out = []
    for step in STEPS:
        seconds, nbytes_down, nbytes_home, basis = rows[step]
        if not known and step not in ("set-up", "train"):
            seconds, nbytes_down, nbytes_home, basis = 0.0, 0, 0, "model size unknown: not estimated"
        if not known and step == "train":
            nbytes_home = 0
        machine = dph * seconds / 3600
        bandwidth = nbytes_down / 1e9 * down + nbytes_home / 1e9 * up
        out.append({"step": step, "hours": round(seconds / 3600, 3), "machine_usd": round(machine, 4),
                    "bytes_down": int(nbytes_down), "bytes_home": int(nbytes_home),
                    "bandwidth_usd": round(bandwidth, 4), "usd": round(machine + bandwidth, 4), "basis": basis})
    return out


def estimate(offer: dict, w: Optional[TrainWorkload], planned_hours: float, setup_hours: float,
             step_timeout_s: float = 6 * 3600) -> dict:
    """Pre-rent estimate on `offer`: the step rows and their sum, with the clock of the train step; or,
    when the training speed or size is unknown, $/h x machine.planned_hours."""
    dph = float(offer["dph_total"])
    rows = step_rows(offer, w, setup_hours, step_timeout_s)
    if rows is None:
        return {"basis": "$/h x machine.planned_hours", "planned_hours": planned_hours,
                "estimated_usd": round(dph * planned_hours, 4)}
    speed = expected_speed(offer.get("gpu_name", ""), w, _gpus(offer, w))
    return {"basis": "every step's hours x $/h + bytes x $/GB", "rows": rows,
            "planned_hours": round(sum(r["hours"] for r in rows), 3),
            "train_hours": next(r["hours"] for r in rows if r["step"] == "train"),
            "bytes_down": sum(r["bytes_down"] for r in rows), "bytes_home": sum(r["bytes_home"] for r in rows),
            "bandwidth_usd": round(sum(r["bandwidth_usd"] for r in rows), 4),
            "inet_down_cost": _per_gb(offer, "inet_down_cost"), "inet_up_cost": _per_gb(offer, "inet_up_cost"),
            "expected_samples_per_s": speed["samples_per_s"], "speed_source": speed["source"],
            "num_gpus": speed["num_gpus"], "per_gpu_samples_per_s": speed["per_gpu_samples_per_s"],
            "scaling": speed["scaling"],
            "clock": clock(w, speed["samples_per_s"], step_timeout_s, str(offer.get("gpu_name"))),
            "estimated_usd": round(sum(r["usd"] for r in rows), 4)}


def expected_home_bytes(w: Optional[TrainWorkload], step: str) -> Optional[int]:
    """What one copy home of `step` is expected to hold (a train checkpoint counts as `checkpoint`);
    None when the model's size is unknown."""
    if w is None or w.params is None:
        return None
    size = _sizes(w)
    home = {"checkpoint": size["checkpoint"], "train": size["model"], "convert": size["exports"]}
    return int(home.get(step, SMALL_OUTPUTS))
