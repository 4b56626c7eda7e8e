"""The test split at home: the utterance ids and references the quality gate scores against.

The machine's transcripts are scored against the orchestrator's own copy of the test set, never
the machine's: its references, ids and count are a claim. The set is the one steps/prepare.py
keeps, chosen the same way and in the same order: the test split's rows in source order, a row
without text left out, the first `data.max_eval_samples` kept.

- manifest (demo, tests): the JSONL file read at home; a row's `duration`, when given, is held
  against `data.min_seconds` / `data.max_seconds` as prepare holds the decoded clip's.
- Hub dataset (configs/int8.yaml: MLS French): the test split's id and text columns streamed at
  home with `datasets` (the audio is never decoded), cached under `runs/.home-references/` by
  dataset id, commit (the `data.revision` tasks/revisions.py pinned, as the machine reads), config,
  split and selection.

What home cannot see: a clip prepare drops for its audio (unreadable, silent, too long once
decoded). Such a clip is missing from the machine's transcripts and fails the gate, naming it.

Plain code, no Prefect: tasks/verdict.py calls `home_test_set`.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from contract.config import DataConfig, RunConfig
from contract.fingerprint import manifest_audio_path

from .run_dir import runs_dir

CACHE = ".home-references"


@dataclass(frozen=True)
class HomeTestSet:
    """{utterance id: reference} of the test utterances, in prepare's order, and where it was read."""
    refs: dict[str, str]
    source: str


class HomeTestSetUnreadable(RuntimeError):
    """Home could not read the test split; the message says which and how to fix it."""


def _text(value) -> Optional[str]:
    """The reference as prepare keeps it (whitespace collapsed), or None when prepare drops the row."""
    if not isinstance(value, str) or not value.strip():
        return None
    return " ".join(value.split())


def _select(rows: Iterator[tuple[str, object, object]], d: DataConfig) -> dict[str, str]:
    """The first max_eval_samples (id, text) of rows (id, text, duration or None) prepare would keep."""
    refs: dict[str, str] = {}
    for uid, text, duration in rows:
        if len(refs) >= d.max_eval_samples:
            break
        text = _text(text)
        if text is None:
            continue
        if isinstance(duration, (int, float)) and not (d.min_seconds <= duration <= d.max_seconds):
            continue
        refs.setdefault(uid, text)  # a repeated id: prepare keeps both rows, the machine's CSV cannot; it fails there
    return refs


def _manifest_rows(d: DataConfig) -> Iterator[tuple[str, object, object]]:
    path = d.manifest_path()
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                split, audio = row["split"], manifest_audio_path(path, row["audio"])
            except (ValueError, KeyError, TypeError):
                continue  # prepare drops it too (bad_manifest_line)
            if split == "test":
                yield str(row.get("id") or audio.stem), row.get("text"), row.get("duration")


def _hub_rows(d: DataConfig) -> Iterator[tuple[str, object, object]]:
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.load_dataset(d.dataset, d.config, split=d.test_split, streaming=True, revision=d.revision)
    names = ds.column_names
    if names is not None:
        if d.text_column not in names:
            raise HomeTestSetUnreadable(f"dataset {d.dataset} split {d.test_split} has no column {d.text_column!r} "
                                     f"(columns {names}): set data.text_column")
        ds = ds.select_columns([c for c in ("id", "path", d.text_column) if c in names])
    for i, row in enumerate(ds):
        yield str(row.get("id") or row.get("path") or f"test-{i}"), row.get(d.text_column), None


def _cache_file(d: DataConfig, root: Path) -> Path:
    key = json.dumps([d.dataset, d.config, d.test_split, d.text_column, d.max_eval_samples]
                     + ([d.revision] if d.revision else []), sort_keys=True)
    return root / CACHE / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"


def home_test_set(cfg: RunConfig, cache_root: Optional[Path] = None) -> HomeTestSet:
    """The test utterances the machine must have transcribed, read at home (never from the machine)."""
    d = cfg.data
    if d.source == "manifest":
        return HomeTestSet(_select(_manifest_rows(d), d), f"the manifest {d.manifest}")
    source = f"the Hub dataset {d.dataset} ({d.config or 'default'}, split {d.test_split})"
    cache = _cache_file(d, Path(cache_root or runs_dir()))
    try:
        refs = json.loads(cache.read_text(encoding="utf-8"))["refs"]
        return HomeTestSet(dict(refs), source)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        refs = _select(_hub_rows(d), d)
    except HomeTestSetUnreadable:
        raise
    except Exception as e:  # noqa: BLE001 - no network, no such dataset: say what home could not read
        raise HomeTestSetUnreadable(f"home could not read {source} to check the machine's transcripts "
                                 f"({type(e).__name__}: {str(e)[:200]}); check the network and data.*") from None
    if not refs:
        raise HomeTestSetUnreadable(f"{source} has no test utterance with text at home")
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"dataset": d.dataset, "config": d.config, "split": d.test_split, "refs": refs}),
                   encoding="utf-8")
    os.replace(tmp, cache)
    return HomeTestSet(refs, source)
