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
import logging
import os
import uuid
from pathlib import Path
from typing import Optional

from . import bounded_json
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
    """The step's result.json, or None: missing, or (logged) unreadable, too large, too deeply nested,
    broken or not an object. It came from a machine: a bad one means "not done", never an error
    that would stop every later run of the config (bounded_json caps its size and nesting)."""
    p = Path(workdir) / step / RESULT_FILE
    try:
        found = bounded_json.load_file(p)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        logging.getLogger(__name__).warning("%s ignored (the step counts as not done): %s", p, e)
        return None
    if not isinstance(found, dict):
        logging.getLogger(__name__).warning("%s ignored (the step counts as not done): not a JSON object", p)
        return None
    return found


def is_done(cfg: RunConfig, workdir: Path, step: str) -> bool:
    r = read_result(workdir, step)
    return bool(r and r.get("status") == "ok" and r.get("config_hash") == config_hash(cfg, step))


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")  # unique: writers never share it
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)
