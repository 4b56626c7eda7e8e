"""evaluate on a GPU machine: the quantized ONNX variants scored from their fake-quantized PyTorch twin
(bit-true to the export, tests/test_parity.py), the export confirmed token for token on a sample.

No GPU here: eval.quantized_on=fake_quant takes the same path on the CPU (auto picks it on CUDA only),
and its transcripts must be the exports' own."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from contract.quant_spec import QuantSpec
from steps import convert, evaluate
from steps.common import execute_step
from steps.models import build_tiny_random
from conftest import tiny_config


@pytest.mark.parametrize("setting, device, mode", [
    ("auto", "cuda", "fake_quant"), ("auto", "cpu", "onnx"), ("onnx", "cuda", "onnx"), ("fake_quant", "cpu", "fake_quant")])
def test_quantized_variants_are_scored_from_the_twin_on_cuda_only_by_default(setting, device, mode):
    assert evaluate.quantized_on(setting, device) == mode


def test_each_onnx_variant_has_the_twin_it_was_exported_from(tmp_path):
    cfg = tiny_config(**{"quant.scheme": "int4"})
    qat = str(tmp_path / "train" / "model")
    assert evaluate.pytorch_twin("qat_int4", cfg, tmp_path) == (qat, True)
    assert evaluate.pytorch_twin("base_ptq_int4", cfg, tmp_path) == (cfg.model.name_or_path, True)
    assert evaluate.pytorch_twin("qat_onnx_fp32", cfg, tmp_path) == (qat, False)
    assert evaluate.pytorch_twin("base_onnx_fp32", cfg, tmp_path) == (cfg.model.name_or_path, False)
    assert evaluate.pytorch_twin("qat_int8", cfg, tmp_path) is None  # not this run's scheme: scored from the export


@pytest.fixture(scope="module")
def converted(prepared_tiny, tiny_model_dir, tmp_path_factory) -> Path:
    """prepare + train (the tiny model stands in) + the real convert step's four exports."""
    work = tmp_path_factory.mktemp("twin")
    shutil.copytree(prepared_tiny / "prepare", work / "prepare")
    shutil.copytree(tiny_model_dir, work / "train" / "model")
    (work / "train" / "result.json").write_text(json.dumps({"step": "train", "status": "ok", "config_hash": "x",
                                                            "metrics": {}}))
    assert execute_step("convert", tiny_config(), work, convert.run) == 0
    return work


def _evaluate(src: Path, dst: Path, setting: str) -> tuple[dict, dict]:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("evaluate"))
    assert execute_step("evaluate", tiny_config(**{"eval.quantized_on": setting}), dst, evaluate.run) == 0
    metrics = json.loads((dst / "evaluate" / "result.json").read_text())["metrics"]
    hyps = {f.stem.removeprefix("utterances_"): [r["hypothesis"] for r in csv.DictReader(open(f, encoding="utf-8"))]
            for f in (dst / "evaluate").glob("utterances_*.csv")}
    return metrics, hyps


def test_twin_scores_are_the_exports_own(converted, tmp_path):
    twin, twin_hyps = _evaluate(converted, tmp_path / "twin", "fake_quant")
    onnx, onnx_hyps = _evaluate(converted, tmp_path / "onnx", "onnx")
    assert twin["quantized_on"] == "fake_quant" and onnx["quantized_on"] == "onnx"
    # Every test clip is checked (4 <= onnx_check_clips), so either way the transcripts are the export's.
    # The random tiny model has near-ties (a top-2 logit margin of 0.0014 seen on one clip) that fake
    # quantization and ONNX Runtime may break differently: then the variant is scored from its export.
    for name in ("qat_int8", "base_ptq_int8"):
        v = twin["variants"][name]
        assert v["onnx_check"]["clips"] == 4 and "scored_with" not in onnx["variants"][name], v
        assert v["scored_with"] == ("onnx on cpu" if v["onnx_check"]["differ"] else "pytorch fake-quantized on cpu"), v
    assert twin["variants"]["qat_onnx_fp32"]["scored_with"] == "pytorch on cpu"
    assert twin_hyps == onnx_hyps and twin["wer"] == onnx["wer"] and twin["gate"] == onnx["gate"]


def test_an_export_that_is_not_its_twin_is_scored_from_the_export(converted, tmp_path):
    """convert/qat_int8 swapped for the export of another model: the sample disagrees, so the variant is
    scored from the export itself, and the metrics say why."""
    other = tmp_path / "other-model"
    build_tiny_random(other, seed=1)
    convert.convert_model(other, tmp_path / "other", "fp32", "qat_int8", QuantSpec.of("int8"), log=lambda _: None)
    work = tmp_path / "src"
    shutil.copytree(converted, work)
    shutil.rmtree(work / "convert" / "qat_int8")
    shutil.copytree(tmp_path / "other" / "qat_int8", work / "convert" / "qat_int8")
    twin, twin_hyps = _evaluate(work, tmp_path / "twin", "fake_quant")
    onnx, onnx_hyps = _evaluate(work, tmp_path / "onnx", "onnx")
    v = twin["variants"]["qat_int8"]
    assert v["scored_with"] == "onnx on cpu" and v["onnx_check"]["differ"], v
    assert "scored from the export itself" in v["why"]
    assert twin_hyps["qat_int8"] == onnx_hyps["qat_int8"] and twin["wer"]["qat_int8"] == onnx["wer"]["qat_int8"]
    base = twin["variants"]["base_ptq_int8"]  # its own export: the twin, unless a near-tie (see above)
    assert base["scored_with"] == ("onnx on cpu" if base["onnx_check"]["differ"] else "pytorch fake-quantized on cpu")
