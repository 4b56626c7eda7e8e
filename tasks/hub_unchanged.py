"""Nothing new to publish: the Hub repo already holds these exact files.

A scheduled run whose resolved inputs (tasks/revisions.py) and config did not change finds every
step done at home and rents nothing; its model folder and card are then byte for byte the ones an
earlier run published. `hub_holds` compares them with the repo's head on the Hub (git blob ids, or
the LFS sha256 for LFS files) so that the upload makes no commit; `produced_by` names the earlier
run that made them, for the report's "nothing new since <run>". Files on the Hub that this upload
does not carry are not compared: an upload never deletes them either.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional, Union

from huggingface_hub import HfApi

from contract.result_file import RESULT_FILE


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def hub_holds(api: HfApi, repo_id: str, contents: dict[str, Union[Path, bytes]]) -> Optional[dict]:
    """{"commit", "date"} of the repo's head when it holds every path of `contents` (a file or bytes)
    with exactly that content; None when any differs or is missing."""
    info = api.model_info(repo_id, files_metadata=True)
    on_hub = {s.rfilename: s for s in info.siblings or []}
    for path, content in contents.items():
        sibling = on_hub.get(path)
        if sibling is None:
            return None
        data = content if isinstance(content, bytes) else Path(content).read_bytes()
        if sibling.size is not None and sibling.size != len(data):
            return None
        if sibling.lfs is not None:
            same = sibling.lfs.sha256 == hashlib.sha256(data).hexdigest()
        else:
            same = sibling.blob_id == _git_blob_id(data)
        if not same:
            return None
    date = info.last_modified.strftime("%Y-%m-%d %H:%M UTC") if info.last_modified else "an unknown date"
    return {"commit": info.sha, "date": date}


def produced_by(local_work: Path, step: str = "convert") -> Optional[str]:
    """The run directory (its name: `<UTC time>-<flow run id>`) that ran `step` whose outputs this run
    reuses (the oldest run whose result.json for it is this one's, byte for byte); None when unknown."""
    mine = Path(local_work) / step / RESULT_FILE
    try:
        wanted = mine.read_bytes()
    except OSError:
        return None
    runs = sorted(d for d in Path(local_work).parent.parent.iterdir() if d.is_dir())
    for run in runs:
        other = run / "work" / step / RESULT_FILE
        try:
            if other.read_bytes() == wanted:
                return run.name
        except OSError:
            continue
    return None
