"""The disk a run needs on its machine, computed from the config: per part, checked on both sides.

`disk_plan(cfg)` gives GB per part (GB = 2**30 bytes, as `free_disk_gb` counts). At home
(`require_disk`, from the flow's validate_config) the config is refused when `machine.vast.min_disk_gb`
(the disk rented, and the offer filter's value) is below `needed_gb`; on the machine prepare refuses
before writing when the free disk is below what the run still writes. Sizes follow from:

- prepare: rows (data.max_samples + 2 x data.max_eval_samples, at most what a manifest holds) x bytes per
  row: 16-bit PCM at 16 kHz (steps/audio_store.py) for the average clip (a Hub dataset: 15 s
  assumed, MLS French's 1,076.6 h over ~258k utterances; a manifest: data.max_seconds, a bound), plus
  ROW_EXTRA_BYTES. Each split is written once, in place (no second copy while writing).
- the model (the downloaded weights), the final fp32 model, and the checkpoints on disk at once:
  KEEP_CHECKPOINTS plus the one being written (fewer when training saves fewer), each fp32 weights
  plus optimizer moments.
- exports: convert's fp32 and quantized folders of the QAT model and of the base model.
- system: an allowance (an assumption, not measured) for the image and the steps' venv.
"""
from __future__ import annotations

import functools
import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional

from .catalogue import KEEP_CHECKPOINTS

if TYPE_CHECKING:
    from .config import RunConfig

GB = 2**30
# The sizes below are the one owner of these facts: infra/run_estimate.py prices its bytes from them.
PCM_BYTES_PER_SECOND = 2 * 16000  # int16 at 16 kHz: steps/audio_store.py
# A row besides its audio: id, text, speaker, duration and at most 448 int32 labels (1,792 B), Arrow offsets.
ROW_EXTRA_BYTES = 4096
HUB_AVG_CLIP_S = 15.0  # MLS French's hours over its utterances (the paper's figures: docs/REFERENCE.md)
REAL_MODEL = "bofenghuang/whisper-large-v3-distil-fr-v0.2"  # the real job's model (configs/int8.yaml, int4.yaml)
# fp32 weight bytes of the models we know. The real model's: its fp32 weights saved at the real shapes
# (benchmarks/checkpoint.json, results' files model.pt; docs/REFERENCE.md 1d, Checkpoints).
MODEL_BYTES = {
    REAL_MODEL: 3_025_784_135,
    "fixture:whisper-base": 290_403_936,
    "fixture:tiny-random": 14_830_496,
}
# A Hub id whose parameters the Hub cannot count (hub_fp32_bytes): assumed as large as Whisper large
# (~1.55 B parameters x 4 bytes), the largest Whisper.
UNKNOWN_MODEL_BYTES = 1_550_000_000 * 4
# A checkpoint (fp32 weights + the optimizer's moments) of the real model, bytes per optimizer (measured at the
# real shapes: benchmarks/checkpoint.json, results' checkpoint_bytes); another model's scales with its weights.
REAL_CHECKPOINT_BYTES = {"adamw": 9_062_136_108, "adamw8bit": 4_561_820_016}
CHECKPOINT_RATIO = {opt: n / MODEL_BYTES[REAL_MODEL] for opt, n in REAL_CHECKPOINT_BYTES.items()}
# Quantized export MB of the real model per scheme, and its fp32 weights' MB in the same run (measured at the
# real shapes: benchmarks/real_scale.json, steps convert_<scheme> sizes_mb qat_<scheme> and pytorch_fp32).
REAL_EXPORT_MB = {"int8": 782.589, "int4": 470.446}  # int4: the default encoder_layout (nbits: ~535)
REAL_FP32_MB = 3025.686
EXPORT_RATIO = {scheme: mb / REAL_FP32_MB for scheme, mb in REAL_EXPORT_MB.items()}
# The image and the steps' venv (an allowance: a CUDA torch venv is several GB, a CPU one less).
SYSTEM_GB = {"required": 25.0, "none": 5.0}
HEADROOM = 1.10  # logs, pip and tokenizer caches, quantizers' temporary files


def model_bytes(name_or_path: str, revision: Optional[str] = None) -> int:
    """fp32 weight bytes of the model: a known id, a local directory's weight files, another Hub id's
    parameters as its safetensors headers count them at `revision` (hub_fp32_bytes), else Whisper large's."""
    if name_or_path in MODEL_BYTES:
        return MODEL_BYTES[name_or_path]
    p = Path(name_or_path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.iterdir() if f.suffix in (".safetensors", ".bin", ".pt") and f.is_file())
    from .config import hub_model_id

    counted = hub_fp32_bytes(name_or_path, revision) if hub_model_id(name_or_path) else None
    return UNKNOWN_MODEL_BYTES if counted is None else counted


@functools.lru_cache(maxsize=64)
def hub_fp32_bytes(repo_id: str, revision: Optional[str]) -> Optional[int]:
    """4 bytes per parameter of a Hub model at `revision` (None: main), from its safetensors headers
    (huggingface_hub's get_safetensors_metadata: ranged reads of the headers, no weights downloaded),
    on $HF_ENDPOINT (else the public Hub) with $HF_TOKEN if set. None when the Hub cannot say (not
    reachable, no safetensors, a private repo without the token): the caller assumes the largest Whisper."""
    from huggingface_hub import HfApi

    from .hub_config import resolve_endpoint

    api = HfApi(endpoint=resolve_endpoint(), token=os.environ.get("HF_TOKEN") or False)
    try:
        api.model_info(repo_id, revision=revision)  # one request first: an unreachable Hub answers at once
        params = sum(int(n) for n in api.get_safetensors_metadata(repo_id, revision=revision).parameter_count.values())
    except Exception:  # any failure: the safe assumption, never a refusal of its own
        return None
    return 4 * params if params > 0 else None


def checkpoint_bytes(model: float, optimizer: str) -> float:
    """Bytes of one checkpoint of a model of `model` fp32 weight bytes trained with `optimizer`."""
    return CHECKPOINT_RATIO[optimizer] * model


def export_bytes(model: float, scheme: str) -> float:
    """Bytes convert writes for a model of `model` fp32 weight bytes: the fp32 and `scheme` quantized folders
    of the QAT model and of the base model (an fp32 export ~ the fp32 weights)."""
    return 2 * (1 + EXPORT_RATIO[scheme]) * model


def avg_clip_seconds(cfg: "RunConfig") -> float:
    d = cfg.data
    return min(HUB_AVG_CLIP_S, d.max_seconds) if d.source == "hf" else d.max_seconds


def row_bytes(seconds: float) -> int:
    """Bytes one prepared row takes for a clip of `seconds`."""
    return int(PCM_BYTES_PER_SECOND * seconds) + ROW_EXTRA_BYTES


def config_rows(cfg: "RunConfig") -> dict[str, int]:
    """Rows per split prepare keeps at most: the config's caps, and for a manifest what it holds."""
    d = cfg.data
    caps = {"train": d.max_samples, "dev": d.max_eval_samples, "test": d.max_eval_samples}
    if d.source != "manifest":
        return caps
    held = Counter()
    for line in d.manifest_path().read_text(encoding="utf-8").splitlines():
        try:
            held[json.loads(line).get("split")] += 1
        except (ValueError, AttributeError):
            continue
    return {s: min(n, held[s]) for s, n in caps.items()}


def checkpoints_on_disk(cfg: "RunConfig", train_rows: int) -> int:
    """Checkpoints on disk at once: the kept ones plus the one being written, fewer in a short run
    (train saves every save_every optimizer steps, never at the last)."""
    t = cfg.train
    total = t.max_steps or max(1, math.ceil(t.epochs * math.ceil(max(train_rows, 1) / t.per_device_batch_size) / t.grad_accum))
    return min(KEEP_CHECKPOINTS + 1, (total - 1) // t.save_every)


@dataclass(frozen=True)
class DiskPlan:
    parts: dict[str, float]  # GB per part
    rows: dict[str, int]
    clip_s: float

    @property
    def needed_gb(self) -> float:
        """Every part on disk at once (after prepare; checkpoints, model and exports come later), with HEADROOM."""
        return round(sum(self.parts.values()) * HEADROOM, 1)

    def describe(self) -> str:
        p = {k: f"{v:.1f}" for k, v in self.parts.items()}
        return (f"{self.needed_gb:.1f} GB = {HEADROOM:g} x (system {p['system']} + prepare {p['prepare']} "
                f"({sum(self.rows.values()):,} rows x {row_bytes(self.clip_s) / 1e6:.2f} MB, {self.clip_s:g} s clips) + "
                f"model {p['model']} + checkpoints {p['checkpoints']} + final model {p['final_model']} + exports "
                f"{p['exports']})")


def disk_plan(cfg: "RunConfig", rows: Optional[Mapping[str, int]] = None) -> DiskPlan:
    """GB per part of the disk the run uses on its machine; `rows` per split (default: the config's caps)."""
    t = cfg.train
    rows = dict(rows or config_rows(cfg))
    clip_s = avg_clip_seconds(cfg)
    per_row = row_bytes(clip_s)
    model = model_bytes(cfg.model.name_or_path, cfg.model.revision)
    parts = {
        "system": SYSTEM_GB[cfg.machine.gpu],
        "prepare": sum(rows.values()) * per_row / GB,
        "model": model / GB,
        "checkpoints": checkpoints_on_disk(cfg, rows.get("train", 0)) * checkpoint_bytes(model, t.optimizer) / GB,
        "final_model": model / GB,
        "exports": export_bytes(model, cfg.quant.scheme) / GB,
    }
    return DiskPlan({k: round(v, 3) for k, v in parts.items()}, rows, clip_s)


def require_disk(cfg: "RunConfig") -> DiskPlan:
    """The plan, at home before renting; ConfigError with the numbers when machine.vast.min_disk_gb (the
    disk rented and the offer filter's value) cannot hold it. Other backends: the plan, checked on the machine."""
    from .config import ConfigError

    plan = disk_plan(cfg)
    if cfg.machine.backend == "vast" and cfg.machine.vast.min_disk_gb < plan.needed_gb:
        raise ConfigError(f"invalid configuration:\n  machine.vast.min_disk_gb: {cfg.machine.vast.min_disk_gb:g} GB "
                          f"cannot hold this run, which needs {plan.describe()}. Raise machine.vast.min_disk_gb to "
                          f"{math.ceil(plan.needed_gb)} or more, or lower data.max_samples")
    return plan


def free_disk_problem(cfg: "RunConfig", free_bytes: int, rows: Mapping[str, int]) -> tuple[Optional[str], DiskPlan]:
    """On the machine, before prepare writes: why `free_bytes` cannot hold what the run still writes
    (everything but the system part, already installed), or None; and the plan."""
    plan = disk_plan(cfg, rows)
    still = (sum(plan.parts.values()) - plan.parts["system"]) * HEADROOM
    free = free_bytes / GB
    if free >= still:
        return None, plan
    return (f"not enough free disk: {free:.1f} GB free here, and this run still writes {still:.1f} GB (the disk "
            f"plan: {plan.describe()}; here without the system part, already installed). Rent a machine with more "
            f"disk (machine.vast.min_disk_gb) or lower data.max_samples"), plan
