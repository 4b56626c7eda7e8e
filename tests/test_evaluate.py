"""steps/evaluate.py: scoring, bootstrap, the gate, and a tiny end-to-end evaluation."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from steps import evaluate
from steps.common import execute_step
from contract.config import parse_config
from contract.config import load_config


def test_score_counts_corpus_errors_not_mean_of_rates():
    s = evaluate.score(["a b c d", "e f", "g"], ["a x c d", "e f", ""])
    assert s.word_errors.tolist() == [1, 0, 1] and s.words.tolist() == [4, 2, 1]
    assert s.wer == pytest.approx(100 * 2 / 7)  # the mean of per-utterance rates would be 41.7
    assert s.char_errors.tolist()[2] == 1 and s.chars.tolist()[2] == 1


def test_empty_reference_counts_insertions():
    s = evaluate.score(["", "a"], ["x y", "a"])
    assert s.word_errors.tolist() == [2, 0] and s.words.tolist() == [0, 1] and s.wer == 200.0


def test_bootstrap_interval_brackets_the_estimate():
    rng = np.random.default_rng(1)
    n = 200
    words = rng.integers(3, 15, n)
    s = evaluate.Scores(rng.binomial(words, 0.3), words, rng.binomial(words * 5, 0.1), words * 5)
    ci = s.bootstrap(500)
    assert ci["wer"][0] < s.wer < ci["wer"][1] and ci["wer"][1] - ci["wer"][0] < 15
    assert ci["cer"][0] < s.cer < ci["cer"][1]


def _cfg(scheme="int8", max_deg=0.5):
    return parse_config({"name": "t", "model": {"name_or_path": "fixture:tiny-random"}, "quant": {"scheme": scheme},
                         "data": {"source": "manifest", "manifest": "fixtures/french/manifest.jsonl"},
                         "eval": {"max_wer_degradation": max_deg}})


def spread(wer: dict[str, float], n: int = 5000, words: int = 10) -> dict:
    """{variant: per-utterance (errors, words)} with those corpus WERs: n utterances of `words` words,
    the errors spread one at a time over them (a model differs from another by one error on a few)."""
    out = {}
    for v, pct in wer.items():
        total = round(pct * n * words / 100)
        out[v] = ([total // n + (i < total % n) for i in range(n)], [words] * n)
    return out


@pytest.mark.parametrize("wer,passed", [
    ({"qat_fp32": 20.0, "base_fp32": 20.0, "qat_int8": 20.4, "base_ptq_int8": 25.0}, True),
    ({"qat_fp32": 20.0, "base_fp32": 20.0, "qat_int8": 20.6, "base_ptq_int8": 25.0}, False),  # lost > 0.5 points
    ({"qat_fp32": 20.0, "base_fp32": 19.0, "qat_int8": 20.4, "base_ptq_int8": 25.0}, False),  # worse than the baseline
    ({"qat_fp32": 20.0, "base_fp32": 20.0, "qat_int8": 20.4, "base_ptq_int8": 20.1}, False),  # no better than PTQ
    ({"qat_fp32": 20.0, "base_fp32": 20.0, "qat_int8": 20.4}, True),  # no PTQ baseline: only the degradation rule
    ({"qat_fp32": 20.0, "qat_int8": 20.4}, False),  # the baseline was not evaluated
    ({"qat_fp32": 20.0, "base_fp32": 20.0, "base_ptq_int8": 25.0}, False),  # the quantized QAT model is missing
    ({"qat_fp32": 20.0, "base_fp32": 20.0, "qat_int4": 19.0, "qat_int8": 30.0}, False),  # int8 is what counts
])
def test_gate(wer, passed):
    g = evaluate.gate(_cfg(), spread(wer))
    assert g["passed"] is passed and (g["reasons"] == []) is passed


def test_gate_uses_the_configured_scheme():
    g = evaluate.gate(_cfg("int4", 1.0), spread({"qat_fp32": 20.0, "base_fp32": 20.0, "qat_int4": 20.9,
                                                 "base_ptq_int4": 22.0}))
    assert g["passed"] and g["scheme"] == "int4" and g["ptq_wer"] == 22.0


def test_evaluate_tiny_run(prepared_tiny, tiny_onnx_dir, tiny_model_dir, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(prepared_tiny / "prepare", work / "prepare")
    shutil.copytree(tiny_model_dir, work / "train" / "model")  # stands in for the trained model
    shutil.copytree(tiny_onnx_dir, work / "convert" / "qat_int8")  # stands in for the quantized export
    (work / "convert" / "not_a_model").mkdir()
    assert execute_step("evaluate", load_config("tiny"), work, evaluate.run) == 0
    m = json.loads((work / "evaluate" / "result.json").read_text())["metrics"]
    assert set(m["wer"]) == {"base_fp32", "qat_fp32", "qat_int8"}
    assert m["n_utterances"] == 4 and m["missing"] == []
    # the same weights through PyTorch and ONNX Runtime give the same transcripts
    assert m["wer"]["base_fp32"] == m["wer"]["qat_fp32"] == m["wer"]["qat_int8"]
    assert m["wer"]["base_fp32"] > 50  # a random model is wrong
    lo, hi = m["wer_ci"]["qat_int8"]
    assert lo <= m["wer"]["qat_int8"] <= hi
    assert m["gate"]["passed"] and m["gate"]["qat_wer"] == m["wer"]["qat_int8"]  # tiny.yaml allows 1000 points
    rows = list(csv.DictReader(open(work / "evaluate" / "utterances_qat_int8.csv", encoding="utf-8")))
    assert len(rows) == 4 and {"id", "reference", "hypothesis", "errors", "words"} <= set(rows[0])
    errors, words = sum(int(r["errors"]) for r in rows), sum(int(r["words"]) for r in rows)
    assert m["wer"]["qat_int8"] == pytest.approx(round(100 * errors / words, 3))


def test_find_variants_names_onnx_dirs(tmp_path):
    from steps.common import StepContext

    for name in ("qat_fp32", "qat_int8", "base_ptq_int8", "base_fp32"):
        (tmp_path / "convert" / name).mkdir(parents=True)
        (tmp_path / "convert" / name / "encoder_model.onnx").touch()
    (tmp_path / "convert" / "logs").mkdir()
    (tmp_path / "train" / "model").mkdir(parents=True)
    (tmp_path / "train" / "model" / "config.json").write_text("{}")
    variants, missing = evaluate.find_variants(StepContext("evaluate", _cfg(), tmp_path))
    assert [(n, k) for n, _, k in variants] == [("base_fp32", "pytorch"), ("qat_fp32", "pytorch"), ("base_onnx_fp32", "onnx"),
                                                ("base_ptq_int8", "onnx"), ("qat_onnx_fp32", "onnx"), ("qat_int8", "onnx")]
    assert missing == []


def test_evaluate_without_train_or_convert_scores_the_base(prepared_tiny, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(prepared_tiny / "prepare", work / "prepare")
    assert execute_step("evaluate", load_config("tiny"), work, evaluate.run) == 0
    m = json.loads((work / "evaluate" / "result.json").read_text())["metrics"]
    assert list(m["wer"]) == ["base_fp32"] and len(m["missing"]) == 2
    assert not m["gate"]["passed"] and "qat_int8 was not evaluated" in m["gate"]["reasons"]
