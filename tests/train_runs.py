"""steps/train.py driven directly on the tiny random Whisper: a prepared workdir, a StepContext, and
a run interrupted after its second checkpoint, its history (tests/test_train.py, tests/test_ddp.py,
tests/test_rerun.py)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from contract.config import parse_config
from steps import train
from steps.common import StepContext
from steps.models import load_processor

TEXTS = ["bonjour tout le monde", "il fait beau aujourd'hui", "le chat dort sur le canapé",
         "nous allons à la plage", "la voiture est rouge", "merci beaucoup madame"]


def make_prepared(workdir: Path, n_train: int = 6, n_dev: int = 3) -> None:
    """A prepare/ output like steps/prepare.py writes (int16 audio, labels without the start token)."""
    from datasets import Dataset

    tok = load_processor("fixture:tiny-random").tokenizer
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("dev", n_dev)):
        texts = [TEXTS[i % len(TEXTS)] for i in range(n)]
        Dataset.from_dict({
            "id": [f"{split}-{i}" for i in range(n)],
            "text": texts,
            "audio": [(rng.standard_normal(16000) * 3000).astype(np.int16) for _ in texts],
            "labels": [tok(t).input_ids[1:] for t in texts],
        }).save_to_disk(str(workdir / "prepare" / split))
    (workdir / "prepare" / "result.json").write_text(json.dumps({"status": "ok"}))


def context(workdir: Path, resume: bool = False, **train_cfg) -> StepContext:
    raw = {"name": "t", "model": {"name_or_path": "fixture:tiny-random"},
           "data": {"source": "hf", "dataset": "none"}, "quant": {"scheme": train_cfg.pop("scheme", "int8")},
           "train": {"max_steps": 4, "learning_rate": 1e-3, "per_device_batch_size": 2, "grad_accum": 1,
                     "warmup_steps": 1, "eval_every": 2, "save_every": 2, "gradient_checkpointing": False,
                     "num_workers": 0, **train_cfg}}
    ctx = StepContext(step="train", cfg=parse_config(raw), workdir=workdir, resume=resume)
    ctx.out.mkdir(parents=True, exist_ok=True)
    return ctx


def history(ctx: StepContext) -> list[dict]:
    """train/history.jsonl of a run, one dict a line."""
    return [json.loads(l) for l in (ctx.out / "history.jsonl").read_text().splitlines()]


def train_until_interrupted(tmp_path) -> None:
    """Three steps with a checkpoint after each, killed after step 2 (checkpoints step-1, step-2)."""
    make_prepared(tmp_path)
    ctx = context(tmp_path, max_steps=3, save_every=1, eval_every=10)
    ctx.progress = lambda done, total, **kw: (_ for _ in ()).throw(RuntimeError("stop")) if done == 2 else None
    with pytest.raises(RuntimeError):
        train.run(ctx)
