"""steps/prepare.py: a manifest with bad inputs is prepared, the bad ones counted, never fatal."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from steps import prepare
from steps.common import StepContext, StepError, execute_step
from contract.config import parse_config
from contract.layout import REPO_ROOT


def _cfg(manifest: Path, **data):
    return parse_config({"name": "t", "model": {"name_or_path": "fixture:tiny-random"}, "quant": {"scheme": "int8"},
                         "data": {"source": "manifest", "manifest": str(manifest), "max_samples": 50, "max_eval_samples": 50, **data},
                         "machine": {"backend": "local"}})  # a manifest outside the repository: this computer only


def _tone(seconds: float, sr: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


@pytest.fixture
def bad_manifest(tmp_path, french_manifest) -> Path:
    good = {s: [r for r in french_manifest if r["split"] == s][:2] for s in ("train", "dev", "test")}
    rows = [r for rs in good.values() for r in rs]
    (tmp_path / "corrupt.ogg").write_bytes(b"this is not audio at all" * 10)
    sf.write(tmp_path / "long.flac", _tone(40.0), 16000)
    sf.write(tmp_path / "stereo44k.wav", np.stack([_tone(2.0, 44100)] * 2, axis=1), 44100)
    rows += [
        {"audio": str(tmp_path / "corrupt.ogg"), "text": "un fichier abîmé", "speaker": "x", "split": "train"},
        {"audio": good["train"][0]["audio"], "text": "   ", "speaker": "x", "split": "train"},
        {"audio": str(tmp_path / "long.flac"), "text": "bien trop long", "speaker": "x", "split": "test"},
        {"audio": str(tmp_path / "missing.wav"), "text": "absent", "speaker": "x", "split": "dev"},
        {"audio": "stereo44k.wav", "text": "un son stéréo", "speaker": "y", "split": "train"},  # relative to the manifest
    ]
    path = tmp_path / "manifest.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n{not json\n", encoding="utf-8")
    return path


def test_bad_inputs_are_dropped_and_counted(bad_manifest, tmp_path, capsys, tiny_model_dir):
    from datasets import load_from_disk

    workdir = tmp_path / "work"
    assert execute_step("prepare", _cfg(bad_manifest), workdir, prepare.run) == 0
    result = json.loads((workdir / "prepare" / "result.json").read_text())
    m = result["metrics"]
    assert m["counts"] == {"train": 3, "dev": 2, "test": 2}
    assert m["dropped"] == {"unreadable_audio": 2, "empty_text": 1, "too_long": 1, "bad_manifest_line": 3}
    assert m["dropped_by_split"]["test"] == {"too_long": 1, "bad_manifest_line": 1}
    assert m["seconds"]["train"] > 2
    assert "PROGRESS" in capsys.readouterr().out
    train = load_from_disk(str(workdir / "prepare" / "train"))
    assert train.column_names == ["id", "text", "speaker", "duration", "audio", "labels"]  # features: computed by train
    stereo = train.filter(lambda r: r["text"] == "un son stéréo")[0]
    assert abs(len(stereo["audio"]) - 32000) < 200 and abs(stereo["duration"] - 2.0) < 0.02  # 44.1 kHz stereo -> 16 kHz mono
    assert train.features["audio"].feature.dtype == "int16"


def test_labels_have_prefix_but_no_start_token(prepared_tiny):
    from datasets import load_from_disk
    from steps.models import load_processor

    tok = load_processor("fixture:tiny-random").tokenizer
    test = load_from_disk(str(prepared_tiny / "prepare" / "test"))
    for row in test:
        assert row["labels"][:3] == tok.convert_tokens_to_ids(["<|fr|>", "<|transcribe|>", "<|notimestamps|>"])
        assert row["labels"][-1] == tok.eos_token_id and 50258 not in row["labels"]
        assert tok.decode(row["labels"], skip_special_tokens=True) == row["text"]


def test_splits_stay_separate_and_limits_apply(prepared_tiny, french_manifest):
    from datasets import load_from_disk

    by_split = {s: {r["text"] for r in french_manifest if r["split"] == s} for s in ("train", "dev", "test")}
    for split, n in (("train", 16), ("dev", 4), ("test", 4)):
        ds = load_from_disk(str(prepared_tiny / "prepare" / split))
        assert len(ds) == n and set(ds["text"]) <= by_split[split]


def test_no_usable_test_data_is_a_deterministic_error(tmp_path, french_manifest):
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in french_manifest if r["split"] == "train"), encoding="utf-8")
    cfg = _cfg(path, max_samples=2)
    with pytest.raises(StepError, match="no usable test"):
        prepare.run(StepContext("prepare", cfg, tmp_path / "w"))


def test_fixture_manifest_is_split_by_sentence(french_manifest):
    splits: dict[str, set] = {}
    for r in french_manifest:
        splits.setdefault(r["text"], set()).add(r["split"])
        assert (REPO_ROOT / r["audio"]).is_file()
    assert all(len(s) == 1 for s in splits.values())
    n_test = sum(r["split"] == "test" for r in french_manifest)
    assert n_test >= 40 and len(splits) >= 140


def test_resample_keeps_length_and_pitch():
    x = _tone(1.0, 22050)
    y = prepare.resample(x, 22050)
    assert abs(len(y) - 16000) < 64
    spectrum = np.abs(np.fft.rfft(y[1000:15000]))
    assert abs(np.argmax(spectrum) * 16000 / 14000 - 220) < 3


def test_hf_source_local_parquet(tmp_path, french_manifest, tiny_model_dir):
    """The Hugging Face path (streaming, audio decoded here, 8 kHz resampled) on a local parquet dataset."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import load_from_disk

    def clip(row, sr=8000):
        audio, _ = prepare.decode_audio(REPO_ROOT / row["audio"])
        buf = io.BytesIO()
        sf.write(buf, prepare.resample(audio, 16000, sr), sr, format="FLAC")
        return {"bytes": buf.getvalue(), "path": None}

    # parquet shaped like MLS on the Hub: an Audio column (struct bytes/path) declared in the metadata
    meta = {"info": {"features": {"audio": {"_type": "Audio", "sampling_rate": 8000}, "transcript": {"dtype": "string", "_type": "Value"},
                                  "speaker_id": {"dtype": "int64", "_type": "Value"}}}}
    (tmp_path / "data").mkdir()
    for split in ("train", "validation", "test"):
        rows = [r for r in french_manifest if r["split"] == ("dev" if split == "validation" else split)][:3]
        data = {"audio": [clip(r) for r in rows], "transcript": [r["text"] for r in rows], "speaker_id": [7] * 3}
        if split == "train":
            data["audio"].insert(0, {"bytes": b"garbage", "path": None})
            data["transcript"].insert(0, "illisible")
            data["speaker_id"].insert(0, 8)
        table = pa.table(data).replace_schema_metadata({"huggingface": json.dumps(meta)})
        pq.write_table(table, tmp_path / "data" / f"{split}-00000-of-00001.parquet")
    cfg = parse_config({"name": "t", "model": {"name_or_path": "fixture:tiny-random"}, "quant": {"scheme": "int8"},
                        "data": {"source": "hf", "dataset": str(tmp_path), "dev_split": "validation",
                                 "max_samples": 3, "max_eval_samples": 2}})
    m = prepare.run(StepContext("prepare", cfg, tmp_path / "w"))
    assert m["counts"] == {"train": 3, "dev": 2, "test": 2} and m["dropped"] == {"unreadable_audio": 1}
    test = load_from_disk(str(tmp_path / "w" / "prepare" / "test"))
    assert test[0]["speaker"] == "7" and test[0]["text"] == [r for r in french_manifest if r["split"] == "test"][0]["text"]
    assert abs(len(test[0]["audio"]) / 16000 - test[0]["duration"]) < 1e-3
