"""Bytes per prepared row and the data loader's cost per sample, at the real model's feature shape.

    python -m benchmarks.prepare_size [--rows 24] [--out benchmarks/prepare_size.json]

Rows of 15 s (MLS French's average clip) made of the fixture's real speech, with 128 mel bins and
30 s windows (whisper-large-v3's feature extractor settings), stored three ways:
  float32_audio_and_features: what prepare stored before (float32 audio + float32 128 x 3000 log-mel);
  int16_audio: what prepare stores now (steps/audio_store.py), log-mel computed by train's loader;
  fp16_features: the alternative (fp16 log-mel only; evaluate and bench would still need audio).
Per sample, with one torch thread (as in a DataLoader worker), page cache warm, best of 5: the loader's
read of a batch of 8, and for int16_audio the log-mel computation it adds (train's own `Rows`). The
load average is recorded: the cores are shared, and the timings grow with it. The disk peak while
prepare's writer saves a split, polled every 2 ms, over the split's final bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from contract import disk
from contract.layout import REPO_ROOT

CLIP_S = disk.HUB_AVG_CLIP_S
BATCH = 8
SAMPLES_PER_S = 52.2  # int8 QAT, compiled, b8 on an H200 (configs/int8.yaml, docs/REFERENCE.md 1c)


def speech_clips(n: int) -> list[tuple[np.ndarray, str]]:
    """n clips of CLIP_S seconds of the fixture's speech (clips joined end to end), with their text."""
    from steps import prepare

    rows = [json.loads(l) for l in (REPO_ROOT / "fixtures/french/manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    out, i = [], 0
    while len(out) < n:
        parts, texts = [], []
        while sum(len(p) for p in parts) < CLIP_S * 16000:
            audio, sr = prepare.decode_audio(REPO_ROOT / rows[i % len(rows)]["audio"])
            parts.append(prepare.clean_audio(audio, sr))
            texts.append(rows[i % len(rows)]["text"])
            i += 1
        out.append((np.concatenate(parts)[:int(CLIP_S * 16000)], " ".join(texts)))
    return out


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def time_per_sample(fn, n_rows: int, repeats: int = 5) -> float:
    """Best of `repeats` passes (the 2 cores here are shared): seconds per sample."""
    rng = np.random.default_rng(0)
    best = float("inf")
    for _ in range(repeats):
        batches = [rng.choice(n_rows, BATCH, replace=False).tolist() for _ in range(max(1, n_rows // BATCH))]
        t = time.perf_counter()
        for idx in batches:
            fn(idx)
        best = min(best, (time.perf_counter() - t) / (len(batches) * BATCH))
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=24)
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "prepare_size.json")
    args = ap.parse_args()

    import torch
    from datasets import Array2D, Dataset, Features, Sequence, Value, disable_progress_bars, load_from_disk
    from transformers import WhisperFeatureExtractor

    from steps import prepare, train
    from steps.models import load_processor

    disable_progress_bars()
    torch.set_num_threads(1)
    fe = WhisperFeatureExtractor(feature_size=128)  # whisper-large-v3's: 128 mel bins, 30 s windows
    tok = load_processor("fixture:tiny-random").tokenizer
    tok.set_prefix_tokens(language="fr", task="transcribe", predict_timestamps=False)
    clips = speech_clips(args.rows)
    labels = [tok(t).input_ids[1:] for _, t in clips]
    feats = [fe(a, sampling_rate=16000, return_tensors="np").input_features[0].astype(np.float32) for a, _ in clips]
    base = {"id": [f"r{i}" for i in range(len(clips))], "text": [t for _, t in clips], "speaker": [""] * len(clips),
            "duration": [CLIP_S] * len(clips), "labels": labels}
    scalar = {"id": Value("string"), "text": Value("string"), "speaker": Value("string"), "duration": Value("float32"),
              "labels": Sequence(Value("int32"))}
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # before: float32 audio and float32 features (a06f7da's steps/prepare.py schema)
        Dataset.from_dict({**base, "audio": [a for a, _ in clips], "input_features": feats},
                          features=Features({**scalar, "audio": Sequence(Value("float32")),
                                             "input_features": Array2D((128, 3000), "float32")})).save_to_disk(str(tmp / "old"))
        # now: prepare's own writer and schema (int16 audio), the folder's bytes polled while it writes
        peak, done = [0], threading.Event()

        def poll() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], tree_bytes(tmp / "w"))
                time.sleep(0.002)

        (tmp / "w").mkdir()
        poller = threading.Thread(target=poll)
        poller.start()
        prepare._save_split(iter([{k: base[k][i] for k in base} | {"audio": prepare.to_pcm16(clips[i][0])}
                                  for i in range(len(clips))]), prepare._features(), tmp / "w" / "new")
        done.set()
        poller.join()
        shutil.move(tmp / "w" / "new", tmp / "new")
        write_peak = peak[0] / tree_bytes(tmp / "new")
        # the alternative: fp16 features, no audio
        Dataset.from_dict({**base, "input_features": [f.astype(np.float16) for f in feats]},
                          features=Features({**scalar, "input_features": Array2D((128, 3000), "float16")})).save_to_disk(str(tmp / "fp16"))

        old = load_from_disk(str(tmp / "old")).select_columns(["input_features", "labels"]).with_format("numpy")
        fp16 = load_from_disk(str(tmp / "fp16")).select_columns(["input_features", "labels"]).with_format("numpy")
        new_ds = load_from_disk(str(tmp / "new"))
        rows = train.Rows(new_ds, fe)
        audio_only = new_ds.select_columns(["audio", "labels"]).with_format("numpy")
        read = {
            "float32_audio_and_features": lambda idx: torch.from_numpy(np.stack([np.asarray(f, np.float32) for f in old[idx]["input_features"]])),
            "fp16_features": lambda idx: torch.from_numpy(np.stack([np.asarray(f).astype(np.float32) for f in fp16[idx]["input_features"]])),
            "int16_audio": lambda idx: audio_only[idx],
        }
        n = len(clips)
        for name, path in (("float32_audio_and_features", "old"), ("int16_audio", "new"), ("fp16_features", "fp16")):
            per_row = tree_bytes(tmp / path) / n
            results[name] = {"bytes_per_row": round(per_row), "gb_for_61000_rows": round(per_row * 61000 / disk.GB, 1),
                             "read_ms_per_sample": round(1000 * time_per_sample(read[name], n), 3)}
        feature_ms = 1000 * time_per_sample(lambda idx: rows[idx], n) - results["int16_audio"]["read_ms_per_sample"]
        results["int16_audio"]["log_mel_ms_per_sample"] = round(feature_ms, 3)
        for name, r in results.items():
            ms = r["read_ms_per_sample"] + r.get("log_mel_ms_per_sample", 0.0)
            r["loader_ms_per_sample"] = round(ms, 3)
            r["loader_cpu_s_per_optimizer_step_of_32"] = round(32 * ms / 1000, 3)
            r["loader_cores_at_gpu_speed"] = round(SAMPLES_PER_S * ms / 1000, 2)
        # the features train computes from the stored audio vs those stored before (float32 audio)
        diff = np.abs(train.Rows(new_ds, fe)[list(range(n))]["input_features"].numpy() - np.stack(feats))
        results["int16_audio"]["disk_peak_while_writing_x_final"] = round(write_peak, 2)
        results["int16_audio"]["log_mel_abs_diff_vs_float32"] = {"max": float(f"{diff.max():.2e}"),
                                                                 "mean": float(f"{diff.mean():.2e}"),
                                                                 "range_of_features": [round(float(np.min(feats)), 3),
                                                                                       round(float(np.max(feats)), 3)]}
    data = {
        "clip_seconds": CLIP_S, "rows": args.rows, "n_mels": 128, "window_s": 30, "batch": BATCH,
        "torch_threads": 1, "page_cache": "warm",
        "gpu_samples_per_s_assumed": SAMPLES_PER_S,
        "disk_plan_bytes_per_row": disk.row_bytes(CLIP_S),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_average_1min": round(os.getloadavg()[0], 2),
        "chosen": "int16_audio",
        "results": results,
        "command": "python -m benchmarks.prepare_size",
    }
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps(data, indent=2))


if __name__ == "__main__":
    main()
