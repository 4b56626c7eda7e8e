"""contract/quality.py: the paired bootstrap interval of a WER difference and the gate decided on it."""
from __future__ import annotations

import math

import numpy as np
import pytest

from contract.quality import corpus_rate, gate_rule, needed_utterances, paired_difference


def _data(n: int, seed: int = 0, discord: float = 0.2, shift: float = 0.0):
    """Per-utterance (errors, words) of a reference model and of a model that differs from it by one
    error on a `discord` share of the utterances (`shift` of them more often up than down)."""
    rng = np.random.default_rng(seed)
    words = rng.integers(10, 60, n)
    ref = rng.binomial(words, rng.beta(0.5, 9.5, n))
    step = rng.choice([-1, 0, 1], n, p=[discord / 2 - shift, 1 - discord, discord / 2 + shift])
    return (ref, words), (np.clip(ref + step, 0, words), words)


def test_the_paired_interval_is_the_direct_computation():
    ref, quant = _data(300)
    samples, conf = 2000, 0.9
    got = paired_difference(quant, ref, samples, conf)
    # direct: resample utterance indices with the same generator, the same draw for both models, and
    # take the corpus-rate difference of each resample, one resample at a time
    rng = np.random.default_rng(0)
    idx = np.concatenate([rng.integers(0, 300, size=(500, 300)) for _ in range(4)])
    diffs = [corpus_rate(quant[0][i].sum(), quant[1][i].sum()) - corpus_rate(ref[0][i].sum(), ref[1][i].sum())
             for i in idx]
    assert got["diff"] == round(corpus_rate(quant[0].sum(), quant[1].sum()) - corpus_rate(ref[0].sum(), ref[1].sum()), 3)
    assert got["low"] == round(float(np.percentile(diffs, 5)), 3)
    assert got["high"] == round(float(np.percentile(diffs, 95)), 3)
    assert got["utterances"] == 300


def test_a_known_constant_difference_has_a_zero_width_interval():
    words = np.full(50, 20)
    ref = np.random.default_rng(3).integers(0, 5, 50)
    d = paired_difference((ref + 1, words), (ref, words), 500, 0.95)
    assert d["diff"] == d["low"] == d["high"] == 5.0  # one more error in every 20 words, whatever is drawn


def test_pairing_is_what_makes_the_interval_narrow_and_the_width_shrinks_as_one_over_root_n():
    ref, quant = _data(2000)
    d = paired_difference(quant, ref, 2000, 0.95)
    rng = np.random.default_rng(0)  # unpaired: each model's utterances drawn on their own
    a, b = rng.integers(0, 2000, (2000, 2000)), rng.integers(0, 2000, (2000, 2000))
    unpaired = (100 * quant[0][a].sum(1) / quant[1][a].sum(1)) - (100 * ref[0][b].sum(1) / ref[1][b].sum(1))
    assert d["high"] - d["low"] < (np.percentile(unpaired, 97.5) - np.percentile(unpaired, 2.5)) / 3
    z = 1.959964
    assert (d["high"] - d["low"]) / 2 == pytest.approx(z * d["sd"] / math.sqrt(2000), rel=0.1)


def _gate(counts, max_deg=0.5, **kw):
    return gate_rule("int8", counts, max_wer_degradation=max_deg, samples=1000, **kw)


def test_an_inconclusive_gate_fails_and_names_the_test_set_size_that_would_decide():
    ref, quant = _data(100, seed=5, discord=0.4, shift=0.02)
    counts = {"qat_fp32": ref, "base_fp32": ref, "qat_int8": quant,
              "base_ptq_int8": (ref[0] + 2, ref[1])}
    g = _gate(counts)
    d = g["differences"]["qat_fp32"]
    assert d["diff"] <= 0.5 < d["high"]  # within the limit on the point estimate, not on the interval
    assert g["passed"] is False and g["inconclusive"] is True
    assert g["needed_utterances"] == d["needed"] > 100
    assert any(r.startswith("inconclusive") and f"about {d['needed']} utterances" in r for r in g["reasons"])
    # the same utterances, k times over, as many as the gate asked for: now it decides
    k = math.ceil(g["needed_utterances"] * 1.1 / 100)
    big = {v: (np.tile(e, k), np.tile(w, k)) for v, (e, w) in counts.items()}
    g2 = _gate(big)
    assert g2["passed"] is True and g2["inconclusive"] is False, g2["reasons"]


def test_a_point_estimate_within_the_limit_is_not_enough():
    """The old rule (qat <= qat_fp32 + 0.5 on point estimates) passed this; the interval does not."""
    ref, quant = _data(100, seed=5, discord=0.4, shift=0.02)
    g = _gate({"qat_fp32": ref, "base_fp32": ref, "qat_int8": quant})
    assert g["qat_wer"] <= g["qat_fp32_wer"] + 0.5 and g["passed"] is False


def test_each_reference_is_a_separate_requirement_and_ptq_is_compared_on_the_point_estimate():
    ref, quant = _data(5000, seed=2)
    worse_base = (np.maximum(ref[0] - 1, 0), ref[1])  # the baseline scores better than the QAT fp32 weights
    counts = {"qat_fp32": ref, "base_fp32": worse_base, "qat_int8": quant, "base_ptq_int8": (ref[0] + 1, ref[1])}
    g = _gate(counts)
    assert g["passed"] is False and g["differences"]["base_fp32"]["low"] > 0.5
    assert any("qat_int8 - base_fp32" in r and "over the allowed +0.5" in r for r in g["reasons"])
    assert _gate(counts, references=["qat_fp32"])["passed"] is True
    no_ptq_win = {**counts, "base_ptq_int8": quant}  # PTQ as good as QAT: the point estimates tie, passes
    assert _gate(no_ptq_win, references=["qat_fp32"])["passed"] is True
    ptq_wins = {**counts, "base_ptq_int8": (np.maximum(quant[0] - 1, 0), quant[1])}
    g = _gate(ptq_wins, references=["qat_fp32"])
    assert g["passed"] is False and "qat_int8 WER" in g["reasons"][0] and "> base_ptq_int8 WER" in g["reasons"][0]


def test_missing_variants_fail_and_mismatched_utterances_are_refused():
    ref, quant = _data(100)
    assert _gate({"qat_fp32": ref, "qat_int8": quant})["reasons"] == ["base_fp32 was not evaluated"]
    assert _gate({"qat_fp32": ref, "base_fp32": ref})["reasons"] == ["qat_int8 was not evaluated"]
    short = (ref[0][:50], ref[1][:50])
    g = _gate({"qat_fp32": short, "base_fp32": ref, "qat_int8": quant}, references=["qat_fp32"])
    assert g["passed"] is False and "same utterances" in g["reasons"][0]


def test_needed_utterances_follows_the_variance():
    d = {"diff": 0.1, "sd": 2.0, "utterances": 10}
    assert needed_utterances(d, 0.5, 0.95) == math.ceil((1.959964 * 2.0 / 0.4) ** 2)
    assert needed_utterances({**d, "diff": 0.5}, 0.5, 0.95) is None
