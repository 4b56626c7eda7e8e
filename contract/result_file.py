"""A step's result.json: written last and atomically by the step, read by both sides.

    {"step", "config", "config_hash", "status": "ok", "metrics": {...}, "outputs": [relative paths],
     "started_at", "finished_at", "seconds", "device"}

A step whose result.json holds the config hash of its sections is done for that config.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from .catalogue import STEP_SECTIONS
from .config import RunConfig

RESULT_FILE = "result.json"
ERROR_FILE = "error.json"


def config_hash(cfg: RunConfig, step: str) -> str:
    return cfg.section_hash(*STEP_SECTIONS[step])


def read_result(workdir: Path, step: str) -> Optional[dict]:
    p = Path(workdir) / step / RESULT_FILE
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_done(cfg: RunConfig, workdir: Path, step: str) -> bool:
    r = read_result(workdir, step)
    return bool(r and r.get("status") == "ok" and r.get("config_hash") == config_hash(cfg, step))


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)
