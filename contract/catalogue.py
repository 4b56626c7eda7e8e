"""The steps, in order, and every fact about them that both sides rely on.

    python -m steps <step> --config run.yaml --workdir DIR [--resume] [--force]

A step writes its outputs to DIR/<step>/ and DIR/<step>/result.json last (contract/result_file.py).
It exits EXIT_OK, EXIT_RETRYABLE (transient: worth a retry) or EXIT_DETERMINISTIC (bad config, OOM,
a broken invariant), printing `PROGRESS {...}` lines while it works and `STEP_ERROR {...}` on failure.
"""
from __future__ import annotations

import json
import re
from typing import Literal, Optional, get_args

from . import bounded_json

# The config sections each step's outputs depend on: changing bench settings must not retrain.
STEP_SECTIONS: dict[str, tuple[str, ...]] = {
    "prepare": ("model", "data"),
    "train": ("model", "data", "quant", "train"),
    "convert": ("model", "data", "quant", "train"),
    "bench": ("model", "data", "quant", "train", "bench"),
    "evaluate": ("model", "data", "quant", "train", "eval"),
}
STEPS = tuple(STEP_SECTIONS)

EXIT_OK, EXIT_RETRYABLE, EXIT_DETERMINISTIC = 0, 1, 3

PROGRESS_PREFIX = "PROGRESS "
ERROR_PREFIX = "STEP_ERROR "
GPUS_PREFIX = "GPUS "  # steps/bootstrap.py: the GPUs the machine has, counted at setup (nvidia-smi and torch)


def marked_json(line: str, prefix: str) -> Optional[dict]:
    """The JSON object a step printed after `prefix` (PROGRESS_PREFIX, ERROR_PREFIX) on this line; None
    when the line is not one. A marked line whose JSON is broken, too deep (contract/bounded_json.py)
    or not an object raises ValueError saying so: the caller logs it and goes on."""
    if not line.startswith(prefix):
        return None
    found = bounded_json.loads(line[len(prefix):])
    if not isinstance(found, dict):
        raise bounded_json.UnsafeJSON(f"a JSON {type(found).__name__}, not an object")
    return found


def error_line(step: str, kind: str, message: str, retryable: bool) -> str:
    """The STEP_ERROR line a step (or the set-up) prints when it fails; home reads it with marked_json."""
    return ERROR_PREFIX + json.dumps({"step": step, "type": kind, "message": message, "retryable": retryable})


# Bulky outputs not copied home once a step succeeded: prepare's datasets (re-derived on a new
# machine), train's checkpoints (the final model supersedes them; while training runs, the
# newest one is copied home on its own) and the checkpoints of another config it set aside.
BULK_OUTPUTS: dict[str, tuple[str, ...]] = {"prepare": ("train", "dev", "test"),
                                            "train": ("checkpoints", "checkpoints-set-aside")}
# What a step may send home: path components of letters, digits and ._+=,@- (no links, no `..`:
# infra/machines/archive.py checks every member of the one archive a step's outputs come home in).
OUTPUT_NAME = re.compile(r"[A-Za-z0-9._+=,@-]+(/[A-Za-z0-9._+=,@-]+)*")
# The most a step's outputs may unpack to at home (infra/machines/archive.py max_bytes, decompressed), from
# what each step writes at the real model's shapes (docs/REFERENCE.md 1d, benchmarks/checkpoint.json):
# train's fp32 model and, after a failure, its last 2 checkpoints with their optimizer state; convert's
# two fp32 ONNX exports (more than the weights, with the decoder copies) and two quantized ones; the
# other steps write JSON and CSV.
OUTPUT_CAP_BYTES: dict[str, int] = {"prepare": 1 * 1000**3, "train": 40 * 1000**3, "convert": 40 * 1000**3,
                                    "bench": 1 * 1000**3, "evaluate": 1 * 1000**3}
# Steps whose bulk never comes home: a new machine runs them again.
REDERIVED = ("prepare",)

# The step that resumes from checkpoints: DIR/<RESUMING_STEP>/<CHECKPOINT_DIR>/step-<N>/.
RESUMING_STEP = "train"
CHECKPOINT_DIR = "checkpoints"
# The save policy: the newest KEEP_CHECKPOINTS checkpoints stay; older ones are deleted once a new one is
# complete, so KEEP_CHECKPOINTS + 1 are on disk while one is written (contract/disk.py counts them).
KEEP_CHECKPOINTS = 2
# Checkpoints written under another config hash: moved to DIR/<RESUMING_STEP>/<SET_ASIDE_DIR>/<hash>/step-<N>/,
# kept and named, never resumed.
SET_ASIDE_DIR = "checkpoints-set-aside"
_CHECKPOINT = re.compile(r"step-([0-9]{1,9})")


def checkpoint_name(step: int) -> str:
    return f"step-{int(step)}"


def checkpoint_number(name: str) -> Optional[int]:
    """The optimizer step of a checkpoint folder named exactly `step-<digits>`; None for anything else."""
    m = _CHECKPOINT.fullmatch(name)
    return int(m.group(1)) if m else None


def quantized_variant(scheme: str) -> str:
    """The name of the QAT model quantized with `scheme`: its convert/ folder and its results' key."""
    return f"qat_{scheme}"


def ptq_variant(scheme: str) -> str:
    """The base model plainly quantized with `scheme` (post-training quantization, the comparison)."""
    return f"base_ptq_{scheme}"


Scheme = Literal["int8", "int4"]  # quant.scheme's values; the qat flow's `quantization` parameter takes them too
SCHEMES: tuple[str, ...] = get_args(Scheme)
# Every variant name evaluate and bench record (steps/evaluate.py find_variants, steps/bench.py): the
# orchestrator shows a machine-sent variant name only when it is one of these.
KNOWN_VARIANTS = frozenset(
    {"base_fp32", "qat_fp32", "base_onnx_fp32", "qat_onnx_fp32", "qat_fp16", "faster_whisper_int8"}
    | {name for s in SCHEMES for name in (quantized_variant(s), ptq_variant(s), f"{quantized_variant(s)}_torchao")})
