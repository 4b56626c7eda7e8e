"""Prepare sized for the real job: int16 rows, features computed by train's loader, the run's disk
plan (contract/disk.py) refused at home before renting and on the machine before writing."""
from __future__ import annotations

import json
import logging
import math
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from contract import disk
from contract.catalogue import EXIT_DETERMINISTIC, KEEP_CHECKPOINTS
from contract.config import ConfigError, load_config
from contract.layout import REPO_ROOT
from steps import prepare, train
from steps.audio_store import to_float, to_pcm16
from steps.common import execute_step
from steps.models import load_processor

from conftest import tiny_config
from hub_server import hub_fixture


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_a_prepared_row_takes_16_bit_audio_not_float_features(prepared_tiny):
    """Bytes on disk per row: 2 bytes per sample plus a few hundred; a06f7da stored float32 audio and
    80 x 3000 float32 features (> 960,000 bytes per row whatever the clip's length)."""
    from datasets import load_from_disk

    path = prepared_tiny / "prepare" / "train"
    ds = load_from_disk(str(path))
    assert set(ds.column_names) == {"id", "text", "speaker", "duration", "audio", "labels"}
    seconds = sum(ds["duration"])
    stored = _tree_bytes(path)
    assert stored <= sum(disk.row_bytes(s) for s in ds["duration"])  # the disk plan's bound holds
    assert stored / (seconds * disk.PCM_BYTES_PER_SECOND) < 1.1, (stored, seconds)


def test_train_features_match_those_stored_before(tmp_path, prepared_tiny, french_manifest):
    """Train's loader computes log-mel from the stored int16 clip; compared with the features a06f7da
    stored (from float32 audio): mean |diff| <= 1e-3 and max <= 0.05 (16-bit quantization noise in
    near-silent frames; the features span about -0.8..1.5). A 16-bit source (MLS French's FLAC) is lossless."""
    from datasets import load_from_disk

    fe = load_processor("fixture:tiny-random").feature_extractor
    test = load_from_disk(str(prepared_tiny / "prepare" / "test"))
    by_id = {r["id"]: r for r in french_manifest}
    floats = [prepare.clean_audio(*prepare.decode_audio(REPO_ROOT / by_id[i]["audio"])) for i in test["id"]]
    before = np.stack([fe(a, sampling_rate=16000, return_tensors="np").input_features[0] for a in floats])
    now = train.Rows(test, fe)[list(range(len(test)))]["input_features"].numpy()
    diff = np.abs(now - before)
    assert now.shape == before.shape == (len(test), 80, 3000)
    assert diff.mean() <= 1e-3 and diff.max() <= 0.05, (diff.mean(), diff.max())

    pcm16 = tmp_path / "clip.flac"  # a 16-bit source: the int16 round trip is exact
    sf.write(pcm16, floats[0], 16000, subtype="PCM_16")
    decoded, _ = prepare.decode_audio(pcm16)
    assert np.array_equal(to_float(to_pcm16(decoded)), decoded)


def test_train_step_trains_on_prepared_int16_rows(tmp_path, prepared_tiny):
    """The train step on what prepare wrote (real fixture speech), features computed by its loader."""
    work = tmp_path / "w"
    shutil.copytree(prepared_tiny / "prepare", work / "prepare")
    cfg = tiny_config(**{"train.max_steps": 2, "train.eval_every": 2, "train.save_every": 10})
    assert execute_step("train", cfg, work, train.run) == 0
    m = json.loads((work / "train" / "result.json").read_text())["metrics"]
    assert m["optimizer_steps"] == 2 and math.isfinite(m["train_loss"]) and math.isfinite(m["dev_loss"])
    assert (work / "train" / "model" / "model.safetensors").is_file()


def test_disk_plan_arithmetic_of_the_real_job():
    cfg = load_config("int8")
    plan = disk.disk_plan(cfg)
    p, gb = plan.parts, disk.GB
    row = 15 * 32000 + disk.ROW_EXTRA_BYTES
    assert plan.rows == {"train": 60000, "dev": 500, "test": 500} and disk.row_bytes(15) == row
    assert p["prepare"] == pytest.approx(61000 * row / gb, abs=1e-3)
    model = disk.MODEL_BYTES[cfg.model.name_or_path]
    assert p["model"] == p["final_model"] == pytest.approx(model / gb, abs=1e-3)
    ckpt = disk.REAL_CHECKPOINT_BYTES["adamw"]  # measured: benchmarks/checkpoint.json
    assert p["checkpoints"] == pytest.approx((KEEP_CHECKPOINTS + 1) * ckpt / gb, abs=1e-3)  # adamw, saved every 3000
    int8_mb = disk.REAL_EXPORT_MB["int8"]  # measured: benchmarks/real_scale.json
    assert p["exports"] == pytest.approx(2 * (1 + int8_mb / disk.REAL_FP32_MB) * model / gb, abs=1e-3)
    assert set(p) == {"system", "prepare", "model", "checkpoints", "final_model", "exports"}
    assert plan.needed_gb == round(sum(p.values()) * 1.1, 1)
    assert plan.needed_gb <= cfg.machine.vast.min_disk_gb  # the real job fits its configured disk


def test_the_estimate_prices_the_sizes_the_disk_plan_counts():
    """One owner of the measured sizes (contract/disk.py): the pre-rent estimate's copies home
    (infra/run_estimate.py) are the disk plan's model, checkpoint and exports; a downloaded row its audio."""
    from contract.workload import run_workload
    from infra.run_estimate import DOWNLOAD_BYTES_PER_ROW, expected_home_bytes

    for name, optimizer in (("int8", "adamw"), ("int4", "adamw"), ("int8", "adamw8bit")):
        cfg = load_config(name, {"train.optimizer": optimizer})
        w, model = run_workload(cfg), disk.model_bytes(cfg.model.name_or_path)
        assert model == disk.MODEL_BYTES[disk.REAL_MODEL]
        assert expected_home_bytes(w, "train") == pytest.approx(model, abs=1)
        assert expected_home_bytes(w, "checkpoint") == pytest.approx(disk.REAL_CHECKPOINT_BYTES[optimizer], abs=1)
        assert expected_home_bytes(w, "convert") == pytest.approx(disk.export_bytes(model, name), abs=1)
        assert disk.disk_plan(cfg).parts["exports"] == pytest.approx(disk.export_bytes(model, name) / disk.GB, abs=1e-3)
    assert DOWNLOAD_BYTES_PER_ROW == disk.row_bytes(disk.HUB_AVG_CLIP_S) - disk.ROW_EXTRA_BYTES == 15 * 16000 * 2


def test_disk_plan_follows_the_config():
    small = disk.disk_plan(load_config("tiny"))
    assert small.rows == {"train": 16, "dev": 4, "test": 4}  # what the manifest holds under the caps
    assert disk.checkpoints_on_disk(load_config("tiny"), 16) == 1  # 4 steps, saved at step 2 only
    assert disk.disk_plan(load_config("int8", {"train.optimizer": "adamw8bit"})).parts["checkpoints"] < \
        disk.disk_plan(load_config("int8")).parts["checkpoints"] / 1.9
    more = disk.disk_plan(load_config("int8", {"data.max_samples": 120000}))
    assert more.parts["prepare"] > 1.9 * disk.disk_plan(load_config("int8")).parts["prepare"]


hub = hub_fixture({})


def test_a_hub_model_the_table_does_not_know_is_planned_at_its_own_size(hub, monkeypatch, tiny_model_dir):
    """Its parameters, counted from its safetensors headers at the pinned commit (no weights downloaded),
    x 4 bytes; where the Hub cannot say, the largest Whisper is assumed (never a smaller guess)."""
    from safetensors import safe_open

    folder = Path(tiny_model_dir)
    sha = hub.publish("alice/small-whisper", {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()})
    with safe_open(folder / "model.safetensors", "pt") as f:
        params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    disk.hub_fp32_bytes.cache_clear()
    cfg = load_config("tiny", {"model.name_or_path": "alice/small-whisper", "model.revision": sha})
    assert disk.model_bytes("alice/small-whisper", sha) == 4 * params
    assert disk.disk_plan(cfg).parts["model"] == round(4 * params / disk.GB, 3)
    assert disk.model_bytes("alice/not-there", None) == disk.UNKNOWN_MODEL_BYTES
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: the Hub cannot say
    disk.hub_fp32_bytes.cache_clear()
    assert disk.model_bytes("alice/small-whisper", sha) == disk.UNKNOWN_MODEL_BYTES
    disk.hub_fp32_bytes.cache_clear()


def test_a_config_whose_disk_cannot_hold_the_run_is_refused_before_renting(monkeypatch):
    import tasks.run_dir

    monkeypatch.setattr(tasks.run_dir, "get_run_logger", lambda: logging.getLogger("test"))
    with pytest.raises(ConfigError) as e:
        tasks.run_dir.validate_config.fn("int8", {"data.max_samples": 200000})
    msg = str(e.value)
    need = disk.disk_plan(load_config("int8", {"data.max_samples": 200000})).needed_gb
    assert "machine.vast.min_disk_gb: 150 GB cannot hold" in msg and f"{need:.1f} GB" in msg and need > 150
    assert "201,000 rows x 0.48 MB, 15 s clips" in msg and f"to {math.ceil(need)} or more" in msg
    assert tasks.run_dir.validate_config.fn("int8", {}).name == "int8"  # 150 GB holds the real job


def test_prepare_refuses_before_writing_when_free_disk_is_short(tmp_path, monkeypatch, capsys):
    """On the machine: free disk (shutil.disk_usage) below what the run writes -> a deterministic
    failure (exit 3) naming the numbers, before any split is written."""
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(prepare.shutil, "disk_usage", lambda path: usage(10 * 2**20, 9 * 2**20, 2**20))
    work = tmp_path / "w"
    assert execute_step("prepare", tiny_config(), work, prepare.run) == EXIT_DETERMINISTIC
    err = json.loads((work / "prepare" / "error.json").read_text())
    assert err["retryable"] is False and "not enough free disk: 0.0 GB free here" in err["message"]
    assert "machine.vast.min_disk_gb" in err["message"] and "24 rows" in err["message"]
    assert not (work / "prepare" / "train").exists()
