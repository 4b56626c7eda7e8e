"""A step's result.json: written last and atomically by the step, read by both sides.

    {"step", "config", "config_hash", "status": "ok", "metrics": {...}, "outputs": [relative paths],
     "started_at", "finished_at", "seconds", "device"}

A step whose result.json holds its current config hash is done. That hash covers what its outputs
depend on: the config sections it reads (catalogue.STEP_SECTIONS) and, computed the same way on the
machine and at home, the code, data and model fingerprints of contract/fingerprint.py (`step_inputs`,
also recorded as "inputs"). Changing a learning rate, a steps/ source file, the manifest or an audio
file therefore re-runs the steps concerned; changing bench settings still does not retrain.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Optional

from .catalogue import STEP_SECTIONS
from .config import RunConfig
from .fingerprint import step_inputs

RESULT_FILE = "result.json"
ERROR_FILE = "error.json"


def config_hash(cfg: RunConfig, step: str, inputs: Optional[dict] = None) -> str:
    """The hash a step records: its config sections plus its code/data/model inputs."""
    sections = STEP_SECTIONS[step]
    payload = {"sections": cfg.section_hash(*sections),
               "inputs": inputs if inputs is not None else step_inputs(cfg, sections)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def input_fingerprints(cfg: RunConfig, step: str) -> dict:
    """The code/data/model fingerprints that enter `config_hash` (recorded in result.json)."""
    return step_inputs(cfg, STEP_SECTIONS[step])


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
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")  # unique: writers never share it
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)
