"""What a step's outputs depend on besides its config sections: the code, the data and the model.

Both sides compute these the same way from what they both have (the pushed code, the pushed manifest
and audio, the model name), so the orchestrator's "already done" check agrees with the hash the
machine records in result.json (contract/result_file.py):

* code: sha256 over the sorted relative paths and bytes of contract/**/*.py, steps/**/*.py and
  requirements-remote.txt (what `push_code` sends and the steps run; fixture builders included).
* data: for a manifest, its bytes plus, for every audio file it references (resolved as the prepare
  step resolves it: `manifest_audio_path`), the reference, its size and a sha256 of its bytes
  ("missing" when absent). Bytes rather than mtimes: a copy onto a machine changes mtimes.
  For a Hugging Face dataset: its id, config (splits are in the config section) and commit.
* model: a fixture's name (its builder is in steps/models.py, covered by the code hash); a local
  directory's file names and sizes plus the bytes of files up to 16 MiB (the first and last MiB of
  larger ones); a Hub id with its commit. A local path that does not exist here says so ("absent")
  rather than failing.

A Hub commit is what the orchestrator resolved before renting (tasks/revisions.py writes it into
`model.revision` / `data.revision` of the config both sides read); a revision that is not a commit
id (a branch or tag, or none: a config that did not go through the flow) is marked unresolved.

Keep it cheap: file hashes are cached per (path, size, mtime), so repeated checks only stat.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Optional

from . import layout

CODE_DIRS = ("contract", "steps")
CODE_FILES = (layout.REQUIREMENTS,)
FIXTURE_PREFIX = "fixture:"  # same as steps/models.py (steps import contract, never the reverse)
UNRESOLVED = "revision unresolved"
COMMIT = re.compile(r"[0-9a-f]{40}")
REVISION = re.compile(r"[0-9a-f]{40}|(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._/-]{0,199}")  # a commit, branch or tag
_WHOLE_FILE_BYTES = 16 << 20
_EDGE_BYTES = 1 << 20

_file_cache: dict[tuple[str, int, int, bool], str] = {}


def _file_digest(path: Path, whole: bool = True) -> str:
    """sha256 of a file's bytes (whole=False: size plus first and last MiB when it is large)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, whole)
    hit = _file_cache.get(key)
    if hit is not None:
        return hit
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if whole or st.st_size <= _WHOLE_FILE_BYTES:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:
            h.update(f.read(_EDGE_BYTES))
            f.seek(-_EDGE_BYTES, os.SEEK_END)
            h.update(f.read(_EDGE_BYTES))
    _file_cache[key] = digest = h.hexdigest()
    return digest


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def code_hash(root: Optional[Path] = None) -> str:
    """Hash of the code steps run with: contract/ and steps/ sources and the remote requirements."""
    root = Path(root or layout.REPO_ROOT)
    files = [p for d in CODE_DIRS for p in (root / d).rglob("*.py")
             if "__pycache__" not in p.parts and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    files += [root / f for f in CODE_FILES if (root / f).is_file()]
    return _digest({p.relative_to(root).as_posix(): _file_digest(p) for p in sorted(files)})


def manifest_audio_path(manifest: Path, audio: str) -> Path:
    """Where a manifest's audio reference points: absolute as is; relative to the repository root
    when it exists there, else relative to the manifest's folder."""
    p = Path(audio)
    if p.is_absolute():
        return p
    return layout.REPO_ROOT / p if (layout.REPO_ROOT / p).exists() else Path(manifest).parent / p


def check_revision(v: Optional[str]) -> Optional[str]:
    """v when it is a commit id or a branch/tag name, else ValueError saying what is accepted."""
    if v is not None and not REVISION.fullmatch(v):
        raise ValueError("must be a Hub commit id (40 hex digits) or a branch or tag name (letters, digits, "
                         "'._/-', no '..'), e.g. main")
    return v


def hub_model_id(name_or_path: str) -> bool:
    """Whether model.name_or_path names a Hub repository (not a fixture, not an absolute folder)."""
    return not name_or_path.startswith(FIXTURE_PREFIX) and not Path(name_or_path).is_absolute()


def hub_revision(revision: Optional[str]) -> str:
    """A Hub revision as the hash records it: the commit id, or the name marked unresolved."""
    if revision and COMMIT.fullmatch(revision):
        return revision
    return f"{revision} ({UNRESOLVED})" if revision else UNRESOLVED


def data_fingerprint(data) -> str:
    """The data a run reads (`data` is the config's data section)."""
    if data.source != "manifest":
        return f"hf:{data.dataset}/{data.config or '-'}@{hub_revision(data.revision)}"
    path = data.manifest_path()
    if not path.is_file():
        return f"manifest:{data.manifest}:absent"
    audio: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            ref = json.loads(line)["audio"]
        except (ValueError, KeyError, TypeError):
            continue  # the prepare step drops and counts such lines; the manifest bytes cover them
        if not isinstance(ref, str) or ref in audio:
            continue
        a = manifest_audio_path(path, ref)
        audio[ref] = f"{a.stat().st_size}:{_file_digest(a)}" if a.is_file() else "missing"
    return "manifest:" + _digest({"manifest": _file_digest(path), "audio": audio})


def model_fingerprint(name_or_path: str, revision: Optional[str] = None) -> str:
    """The model a run starts from: fixture name, local directory content, or Hub id at `revision`."""
    if name_or_path.startswith(FIXTURE_PREFIX):
        return name_or_path
    p = Path(name_or_path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and not any(x.startswith(".") for x in f.relative_to(p).parts))
        return "local:" + _digest({f.relative_to(p).as_posix(): f"{f.stat().st_size}:{_file_digest(f, whole=False)}"
                                   for f in files})
    if p.is_absolute() or name_or_path.startswith(".") or name_or_path.count("/") > 1:
        return f"local:{name_or_path}:absent"
    return f"hub:{name_or_path}@{hub_revision(revision)}"


def step_inputs(cfg, sections: tuple[str, ...]) -> dict[str, str]:
    """The non-config inputs of a step that depends on `sections` (recorded in result.json)."""
    inputs = {"code": code_hash()}
    if "data" in sections:
        inputs["data"] = data_fingerprint(cfg.data)
    if "model" in sections:
        inputs["model"] = model_fingerprint(cfg.model.name_or_path, cfg.model.revision)
    return inputs


def inputs_in_words(cfg) -> dict[str, str]:
    """What the model and the data are, as the step hash records them, in words (report and card)."""
    m, d = cfg.model, cfg.data
    if m.name_or_path.startswith(FIXTURE_PREFIX):
        model = f"{m.name_or_path}, built by the pushed code (its hash covers it)"
    elif Path(m.name_or_path).is_absolute():
        model = f"local folder {m.name_or_path}, content hash {model_fingerprint(m.name_or_path).split(':')[-1]}"
    else:
        model = f"Hub model {m.name_or_path} at commit {m.revision or 'unresolved'}"
    if d.source == "hf":
        data = f"Hub dataset {d.dataset}" + (f" ({d.config})" if d.config else "") + f" at commit {d.revision or 'unresolved'}"
    else:
        data = f"manifest {d.manifest}, content hash {data_fingerprint(d).split(':')[-1]} (manifest and audio bytes)"
    return {"model": model, "data": data}
