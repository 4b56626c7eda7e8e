"""Step prepare: audio + transcripts -> 16 kHz clips, log-mel features and decoder labels.

Sources: a Hugging Face dataset (streamed; audio decoded here, not by `datasets`) or a JSONL
manifest. Train, dev and test stay separate. Bad inputs are dropped and counted per reason and
per split, never fatal. Each split is written once, in `Dataset.save_to_disk`'s layout
(`load_from_disk` reads it), to prepare/<split>/ with columns id, text, speaker, duration, audio (int16 PCM, 16 kHz: steps/audio_store.py) and labels;
log-mel features are computed from the audio by the train step's data loader, not stored. Before
writing, the run's disk plan (contract/disk.py) is checked against the free disk here.

Labels are `<|fr|><|transcribe|><|notimestamps|> text <|endoftext|>`, WITHOUT the decoder start
token `<|startoftranscript|>`: the model prepends it when it shifts labels right.
"""
from __future__ import annotations

import io
import json
import os
import shutil
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from contract.config import RunConfig
from contract.disk import free_disk_problem
from contract.fingerprint import manifest_audio_path

from .audio_store import to_pcm16
from .common import StepContext, StepError
from .models import load_processor

SPLITS = ("train", "dev", "test")
SAMPLE_RATE = 16000


class Drop(Exception):
    """An example that cannot be used; its message is the drop reason."""


# ---------------------------------------------------------------- audio

def resample(audio: np.ndarray, sr: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 at `target` Hz (libswresample through PyAV)."""
    if sr == target:
        return audio.astype(np.float32, copy=False)
    import av

    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio, dtype=np.float32)[None, :], format="flt", layout="mono")
    frame.sample_rate = sr
    resampler = av.AudioResampler(format="flt", layout="mono", rate=target)
    chunks = [f.to_ndarray()[0] for f in resampler.resample(frame)] + [f.to_ndarray()[0] for f in resampler.resample(None)]
    return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)


def decode_audio(source: str | Path | bytes) -> tuple[np.ndarray, int]:
    """(mono float32 samples, sampling rate) from a path or encoded bytes; PyAV as a fallback."""
    import soundfile as sf

    handle = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    try:
        audio, sr = sf.read(handle, dtype="float32", always_2d=True)
        return audio.mean(axis=1), int(sr)
    except Exception:  # noqa: BLE001 - formats libsndfile lacks (mp3 on old builds, m4a): try FFmpeg
        pass
    try:
        from faster_whisper.audio import decode_audio as av_decode

        return av_decode(io.BytesIO(source) if isinstance(source, bytes) else str(source), sampling_rate=SAMPLE_RATE), SAMPLE_RATE
    except Exception as e:  # noqa: BLE001
        raise Drop("unreadable_audio") from e


def clean_audio(audio: Any, sr: int) -> np.ndarray:
    """Validate and resample one clip; raises Drop with the reason."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 2:
        audio = audio.mean(axis=0 if audio.shape[0] < audio.shape[1] else 1)
    if audio.ndim != 1 or not sr or sr <= 0:
        raise Drop("bad_audio_shape")
    if audio.size == 0:
        raise Drop("empty_audio")
    if not np.isfinite(audio).all():
        raise Drop("non_finite_audio")
    audio = resample(audio, int(sr))
    if not np.any(audio):
        raise Drop("silent_audio")
    return audio


# ---------------------------------------------------------------- sources

def manifest_examples(cfg: RunConfig, split: str) -> Iterator[dict]:
    """Examples of one split from the JSONL manifest; each yields a 'load' callable for its audio."""
    path = cfg.data.manifest_path()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                row_split = row["split"]
                audio_path = manifest_audio_path(path, row["audio"])  # the data fingerprint resolves it the same way
            except (ValueError, KeyError, TypeError):
                yield {"split": split, "drop": "bad_manifest_line", "where": f"{path}:{lineno}"}
                continue
            if row_split != split:
                continue
            yield {"id": str(row.get("id") or audio_path.stem), "text": row.get("text"), "speaker": str(row.get("speaker") or ""),
                   "load": (lambda p=audio_path: decode_audio(p)), "where": f"{path}:{lineno}"}


def hf_examples(cfg: RunConfig, split: str) -> Iterator[dict]:
    """Examples of one split from a Hugging Face dataset; audio is decoded here (soundfile/PyAV)."""
    import datasets

    d = cfg.data
    name = {"train": d.train_split, "dev": d.dev_split, "test": d.test_split}[split]
    ds = datasets.load_dataset(d.dataset, d.config, split=name, streaming=d.streaming, revision=d.revision)
    if d.audio_column not in (ds.column_names or [d.audio_column]) or d.text_column not in (ds.column_names or [d.text_column]):
        raise StepError(f"dataset {d.dataset} split {name} has columns {ds.column_names}: "
                        f"set data.audio_column / data.text_column (MLS French uses 'audio' and 'transcript')")
    if isinstance((ds.features or {}).get(d.audio_column), datasets.Audio):
        ds = ds.cast_column(d.audio_column, datasets.Audio(decode=False))  # we decode: no torchcodec needed
    for i, row in enumerate(ds):
        audio = row.get(d.audio_column)
        speaker = row.get("speaker_id", row.get("client_id", ""))
        yield {"id": str(row.get("id") or row.get("path") or f"{split}-{i}"), "text": row.get(d.text_column),
               "speaker": str(speaker if speaker is not None else ""), "load": (lambda a=audio: _hf_audio(a)), "where": f"{name}[{i}]"}


def _hf_audio(audio: Any) -> tuple[np.ndarray, int]:
    if isinstance(audio, (str, bytes)):
        return decode_audio(audio)
    if not isinstance(audio, dict):
        raise Drop("missing_audio")
    if audio.get("bytes"):
        return decode_audio(audio["bytes"])
    if audio.get("path"):
        return decode_audio(audio["path"])
    if audio.get("array") is not None:
        return np.asarray(audio["array"], dtype=np.float32), int(audio.get("sampling_rate") or 0)
    raise Drop("missing_audio")


# ---------------------------------------------------------------- the step

class Preparer:
    """Turns raw examples into rows, counting what it drops."""

    def __init__(self, cfg: RunConfig, processor):
        self.cfg = cfg
        self.tok = processor.tokenizer
        self.tok.set_prefix_tokens(language=cfg.model.language, task=cfg.model.task, predict_timestamps=False)
        self.start_id = self.tok.convert_tokens_to_ids("<|startoftranscript|>")
        self.max_label_len = 448
        self.dropped: dict[str, Counter] = defaultdict(Counter)

    def row(self, ex: dict) -> dict:
        text = ex.get("text")
        if not isinstance(text, str) or not text.strip():
            raise Drop("empty_text")
        text = " ".join(text.split())
        audio, sr = ex["load"]()
        audio = clean_audio(audio, sr)
        duration = len(audio) / SAMPLE_RATE
        d = self.cfg.data
        if duration < d.min_seconds:
            raise Drop("too_short")
        if duration > d.max_seconds:
            raise Drop("too_long")
        labels = self.labels(text)
        if len(labels) > self.max_label_len:
            raise Drop("labels_too_long")
        return {"id": ex["id"], "text": text, "speaker": ex.get("speaker", ""), "duration": float(duration),
                "audio": to_pcm16(audio), "labels": labels}

    def try_row(self, ex: dict, split: str, log) -> dict | None:
        """The row, or None after counting and logging why the example was dropped."""
        try:
            if "drop" in ex:
                raise Drop(ex["drop"])
            return self.row(ex)
        except Drop as d:
            reason = str(d)
        except Exception as e:  # noqa: BLE001 - an odd input must not stop the run; counted and logged
            reason = f"error_{type(e).__name__}"
        self.dropped[split][reason] += 1
        log(f"drop {split} {ex.get('id', '?')} ({ex.get('where', '')}): {reason}")
        return None

    def labels(self, text: str) -> list[int]:
        ids = self.tok(text).input_ids
        if ids and ids[0] == self.start_id:
            ids = ids[1:]
        return ids


def _features():
    from datasets import Features, Sequence, Value

    return Features({"id": Value("string"), "text": Value("string"), "speaker": Value("string"), "duration": Value("float32"),
                     "audio": Sequence(Value("int16")), "labels": Sequence(Value("int32"))})


def _save_split(rows: Iterator[dict], features, out: Path) -> None:
    """Stream rows into a dataset at `out` that `load_from_disk` reads: one Arrow file written once,
    in a temporary folder renamed into place (no cache copy beside it: the disk peak is the split)."""
    from datasets import Dataset
    from datasets.arrow_writer import ArrowWriter

    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        data = tmp / "data-00000-of-00001.arrow"
        with ArrowWriter(features=features, path=str(data), writer_batch_size=64) as writer:
            for row in rows:
                writer.write(row)
            writer.finalize()
        ds = Dataset.from_file(str(data))
        # the two files Dataset.save_to_disk writes beside its Arrow files (it refuses to save a dataset in place)
        state = {k: ds.__dict__[k] for k in ("_fingerprint", "_format_columns", "_format_kwargs", "_format_type",
                                              "_output_all_columns")}
        state.update(_split=None, _data_files=[{"filename": data.name}])
        (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
        ds.info.write_to_directory(str(tmp))  # dataset_info.json
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(ctx: StepContext) -> dict:
    import datasets

    datasets.disable_progress_bars()
    cfg = ctx.cfg
    processor = load_processor(cfg.model.name_or_path, revision=cfg.model.revision)
    prep = Preparer(cfg, processor)
    source = manifest_examples if cfg.data.source == "manifest" else hf_examples
    limits = {"train": cfg.data.max_samples, "dev": cfg.data.max_eval_samples, "test": cfg.data.max_eval_samples}
    if cfg.data.source == "manifest":  # known sizes: report progress against what is there
        available = manifest_split_counts(cfg)
        limits = {s: min(n, available[s]) for s, n in limits.items()}
    total = sum(limits.values())
    ctx.out.mkdir(parents=True, exist_ok=True)
    problem, plan = free_disk_problem(cfg, shutil.disk_usage(ctx.out).free + _tree_bytes(ctx.out), limits)
    if problem:
        raise StepError(problem)
    ctx.log(f"disk plan: {plan.describe()}")
    counts, seconds, done = {}, {}, 0
    features = _features()
    for split in SPLITS:
        kept = {"n": 0, "s": 0.0}

        def rows(split=split, kept=kept):
            nonlocal done
            for ex in source(cfg, split):
                if kept["n"] >= limits[split]:
                    return
                row = prep.try_row(ex, split, ctx.log)
                if row is None:
                    continue
                kept["n"] += 1
                kept["s"] += row["duration"]
                done += 1
                if done % 25 == 0 or kept["n"] == limits[split]:
                    ctx.progress(done, total, split=split)
                yield row

        _save_split(rows(), features, ctx.out / split)
        counts[split], seconds[split] = kept["n"], round(kept["s"], 2)
        ctx.add_output(ctx.out / split)
        ctx.log(f"{split}: kept {kept['n']} clips ({kept['s'] / 60:.1f} min), dropped {dict(prep.dropped[split])}")
        ctx.progress(done, total, split=split, finished=True)
    if counts["train"] == 0 or counts["test"] == 0:
        raise StepError(f"prepare kept no usable {'train' if counts['train'] == 0 else 'test'} examples "
                        f"(dropped: {_dropped(prep)}); check data.* in the config and the source")
    return {"counts": counts, "dropped": _dropped(prep), "dropped_by_split": {s: dict(c) for s, c in prep.dropped.items()},
            "seconds": seconds}


def _tree_bytes(path: Path) -> int:
    """Bytes of the files under `path` (an earlier prepare's outputs: replaced, so their space is free to us)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def manifest_split_counts(cfg: RunConfig) -> Counter:
    """Rows per split in the config's manifest (data.source manifest)."""
    return Counter(_split_of(line) for line in cfg.data.manifest_path().read_text(encoding="utf-8").splitlines())


def _split_of(line: str) -> str | None:
    try:
        return json.loads(line).get("split")
    except (ValueError, AttributeError):
        return None


def _dropped(prep: Preparer) -> dict[str, int]:
    total: Counter = Counter()
    for c in prep.dropped.values():
        total.update(c)
    return dict(total)
