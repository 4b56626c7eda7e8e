"""Home's record of what came home: the only thing that says a step is "already done".

A step's result.json is the machine's file: a machine can write the current step hash into it
itself. So reuse (tasks/run_dir.py) trusts a record that only the orchestrator writes, once a
step's outputs landed at home and were checked (tasks/machine_run.py for each step; tasks/gate.py
for evaluate, only when its transcripts verified against home's test set):

    runs/<config>/<run id>/.home-records/<step>.json   {"step", "config_hash", "files": {path: sha256}}

It sits beside work/, never inside it: the one archive a step's outputs come home in is unpacked
under work/<step>/ (infra/machines/archive.py: relative names, no `..`, no links), so no machine can write
it. A step is done at home only when its result.json holds the current hash, its record exists
with that hash, and the files under work/<step>/ (bulk outputs left out) are exactly the recorded
ones, byte for byte: a forged or edited output, or one without a record, is run again.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Optional

from contract.catalogue import BULK_OUTPUTS
from contract.config import RunConfig
from contract.result_file import config_hash, is_done

RECORDS = ".home-records"
VERIFIED_STEP = "evaluate"  # recorded by tasks/gate.py, only once its transcripts verified against home's test set


def record_path(local_work: Path, step: str) -> Path:
    return Path(local_work).parent / RECORDS / f"{step}.json"


def digests(local_work: Path, step: str) -> Optional[dict[str, str]]:
    """{relative path: sha256} of the regular files under work/<step>/, its bulk outputs left out;
    None when the folder is missing or holds anything but files and folders (a link)."""
    root = Path(local_work) / step
    if not root.is_dir() or root.is_symlink():
        return None
    skip = BULK_OUTPUTS.get(step, ())
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here == root:
            dirnames[:] = [d for d in dirnames if d not in skip]
            filenames = [f for f in filenames if f not in skip]
        for name in dirnames:
            if (here / name).is_symlink():
                return None
        for name in sorted(filenames):
            p = here / name
            if p.is_symlink() or not p.is_file():
                return None
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            out[p.relative_to(root).as_posix()] = h.hexdigest()
    return out


def _recorded_files(local_work: Path, step: str) -> Optional[dict]:
    try:
        record = json.loads(record_path(local_work, step).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return record.get("files") if isinstance(record, dict) else None


def write_record(cfg: RunConfig, local_work: Path, step: str, same_as: Optional[Path] = None) -> bool:
    """Record what is at home for `step` now; only when its result.json holds the current hash and,
    with `same_as` (an earlier run's work/ it was linked from), the files are the ones recorded there.
    Returns whether a record was written."""
    files = digests(local_work, step) if is_done(cfg, local_work, step) else None
    if files is None or (same_as is not None and files != _recorded_files(same_as, step)):
        return False
    path = record_path(local_work, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps({"step": step, "config_hash": config_hash(cfg, step), "files": files},
                              indent=1, sort_keys=True))
    os.replace(tmp, path)
    return True


def done_at_home(cfg: RunConfig, local_work: Path, step: str) -> bool:
    """The step is done for the current hash and what is at home is what home recorded."""
    if not is_done(cfg, local_work, step):
        return False
    try:
        record = json.loads(record_path(local_work, step).read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return (isinstance(record, dict) and record.get("config_hash") == config_hash(cfg, step)
            and record.get("files") is not None and record.get("files") == digests(local_work, step))
