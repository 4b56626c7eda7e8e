"""What a run will do (`TrainWorkload`), computed from its validated config where infra needs it (offers
ranked by the whole run's cost, the pre-rent estimate, the train step's clock, the copy-home caps):
never written into the config."""
from __future__ import annotations

import math
from typing import Optional

from pydantic import ValidationError

from .config import DataConfig, RunConfig
from .machine_config import MODEL_PARAMS, TrainWorkload


def run_workload(cfg: RunConfig) -> Optional[TrainWorkload]:
    """The run's workload from its model, data, train, quant, bench and machine sections; None when it
    cannot be told (offers are then ranked by $/h alone)."""
    t, d = cfg.train, cfg.data
    bs, accum = t.per_device_batch_size, t.grad_accum
    samples = int(t.max_steps * bs * accum) if t.max_steps else math.ceil(t.epochs * d.max_samples)
    try:
        return TrainWorkload(
            scheme=cfg.quant.scheme, micro_batch=bs, compile=t.compile is not False,
            gradient_checkpointing=t.gradient_checkpointing, samples=samples,
            params=MODEL_PARAMS.get(cfg.model.name_or_path), optimizer=t.optimizer, samples_per_step=bs * accum,
            save_every=t.save_every, download_rows=d.max_samples + 2 * d.max_eval_samples if d.source == "hf" else 0,
            prepare_rows=_rows(d), eval_clips=d.max_eval_samples, bench_clips=cfg.bench.max_clips,
            sync_every_s=cfg.machine.checkpoint_sync_every_s)
    except ValidationError:
        return None


def _rows(data: DataConfig) -> int:
    """Rows prepare writes: train (at most data.max_samples) plus dev and test; a manifest holds no more than its lines."""
    rows = data.max_samples + 2 * data.max_eval_samples
    if data.source == "manifest" and data.manifest:
        try:
            with open(data.manifest_path(), "rb") as f:
                rows = min(rows, sum(1 for _ in f))
        except OSError:
            pass
    return rows
