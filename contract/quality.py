"""How a transcript is scored and how the quality gate decides: one rule, used by both sides.

The evaluate step applies it on the machine (steps/evaluate.py); the orchestrator applies it again
at home to the per-utterance transcripts the machine sent back (tasks/verdict.py), so the verdict
that decides an upload is never just the machine's word.

The gate compares variants scored on the same utterances with a paired bootstrap (`paired_difference`:
the utterances are resampled together, so what both models get wrong cancels out). For each
reference R in `eval.gate_references` (qat_fp32 and base_fp32 by default):

    upper bound of the interval of  qat_<scheme> - R  <=  eval.max_wer_degradation

and QAT beats plain PTQ on the point estimate (qat_<scheme> <= base_ptq_<scheme>; its interval is
shown, not required: PTQ beating QAT is a check of the training, not the promise made to the user).
When a point estimate is within the allowed degradation but its interval reaches past it, the test
set is too small to decide: the gate is "inconclusive", which fails, and says how many utterances
would be needed (`needed_utterances`, from the observed per-utterance variance).

WERs are corpus rates in percent (errors summed over utterances / reference words summed).
"""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import Mapping, Optional, Sequence

from .catalogue import ptq_variant, quantized_variant

Counts = tuple[Sequence[int], Sequence[int]]  # per-utterance (word errors, reference words), same order
CHUNK = 500  # bootstrap resamples drawn at once (memory: CHUNK x utterances indices)


def corpus_rate(errors: int, total: int) -> float:
    """Percent, as steps/evaluate.py `Scores.rate`: errors over max(total, 1)."""
    return float(100.0 * errors / max(total, 1))


def paired_difference(a: Counts, b: Counts, samples: int, confidence: float, seed: int = 0) -> dict:
    """Corpus WER of `a` minus that of `b` (points), both scored on the same utterances in the same
    order, with its percentile bootstrap interval: each resample draws utterances with replacement
    and takes the same draw for both. {"diff", "low", "high", "utterances", "sd"}; `sd` is the
    per-utterance standard deviation of the difference (points; the linearized ratio estimator)."""
    import numpy as np

    ea, wa, eb, wb = (np.asarray(x, dtype=np.int64) for x in (*a, *b))
    n = len(ea)
    if not (n and len(wa) == len(eb) == len(wb) == n):
        raise ValueError(f"a paired difference needs the same utterances on both sides ({len(ea)} vs {len(eb)})")
    ra, rb = ea.sum() / max(wa.sum(), 1), eb.sum() / max(wb.sum(), 1)
    influence = (ea - ra * wa) / max(wa.mean(), 1e-12) - (eb - rb * wb) / max(wb.mean(), 1e-12)
    rng = np.random.default_rng(seed)
    diffs = []
    for start in range(0, samples, CHUNK):
        idx = rng.integers(0, n, size=(min(CHUNK, samples - start), n))
        diffs.append(100.0 * (ea[idx].sum(axis=1) / np.maximum(wa[idx].sum(axis=1), 1)
                              - eb[idx].sum(axis=1) / np.maximum(wb[idx].sum(axis=1), 1)))
    tail = 100.0 * (1.0 - confidence) / 2
    low, high = np.percentile(np.concatenate(diffs), [tail, 100.0 - tail])
    return {"diff": round(float(100.0 * (ra - rb)), 3), "low": round(float(low), 3), "high": round(float(high), 3),
            "utterances": n, "sd": round(float(100.0 * influence.std(ddof=1)) if n > 1 else 0.0, 4)}


def needed_utterances(d: dict, threshold: float, confidence: float) -> Optional[int]:
    """Utterances the interval of `d` would need to sit wholly on the side of `threshold` its point
    estimate is on (normal approximation from the observed per-utterance sd); None when the point
    estimate is on the threshold (no size decides) or the sd is zero."""
    margin = abs(threshold - d["diff"])
    if margin == 0 or not d.get("sd"):
        return None
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    return max(d["utterances"], math.ceil((z * d["sd"] / margin) ** 2))


def gate_rule(scheme: str, counts: Mapping[str, Counts], *, max_wer_degradation: float,
              references: Sequence[str] = ("qat_fp32", "base_fp32"), confidence: float = 0.95,
              samples: int = 1000) -> dict:
    """The quality gate over {variant: per-utterance (errors, words)}, every variant on the same
    utterances in the same order. Returns {"passed", "inconclusive", "scheme", "qat_wer",
    "qat_fp32_wer", "ptq_wer", "base_fp32_wer", "max_wer_degradation", "confidence", "references",
    "differences" ({other variant: paired_difference(qat - other) + "needed" for an inconclusive one}),
    "needed_utterances", "reasons"}. A missing quantized variant or reference fails; a missing PTQ
    variant skips that comparison."""
    qname, pname = quantized_variant(scheme), ptq_variant(scheme)
    wer = {v: corpus_rate(sum(int(x) for x in c[0]), sum(int(x) for x in c[1])) for v, c in counts.items()}
    max_deg = max_wer_degradation
    reasons: list[str] = []
    differences: dict[str, dict] = {}
    needed: list[int] = []
    inconclusive = False
    if qname not in counts:
        reasons.append(f"{qname} was not evaluated")
    for ref in references:
        if ref not in counts:
            reasons.append(f"{ref} was not evaluated")
    for other in [*references, pname]:
        if qname not in counts or other not in counts or other in differences:
            continue
        try:
            d = paired_difference(counts[qname], counts[other], samples, confidence)
        except ValueError as e:
            reasons.append(f"{qname} and {other}: {e}")
            continue
        differences[other] = d
        shown = (f"{qname} - {other} = {d['diff']:+.2f} points ({confidence * 100:g} % interval "
                 f"{d['low']:+.2f} to {d['high']:+.2f})")
        if other == pname:
            if d["diff"] > 0:
                reasons.append(f"{qname} WER {wer[qname]:.2f} > {pname} WER {wer[pname]:.2f}: {shown}")
        elif d["high"] > max_deg and d["diff"] <= max_deg:
            inconclusive = True
            d["needed"] = needed_utterances(d, max_deg, confidence)
            if d["needed"]:
                needed.append(d["needed"])
            more = (f"about {d['needed']} utterances would be needed" if d["needed"]
                    else "its point estimate sits on the limit: no test set size decides")
            reasons.append(f"inconclusive: {shown} reaches past the allowed +{max_deg:g} on {d['utterances']} "
                           f"utterances; {more}")
        elif d["high"] > max_deg:
            reasons.append(f"{shown}: over the allowed +{max_deg:g}")
    return {"passed": not reasons, "inconclusive": inconclusive, "scheme": scheme, "qat_wer": _r(wer.get(qname)),
            "qat_fp32_wer": _r(wer.get("qat_fp32")), "ptq_wer": _r(wer.get(pname)),
            "base_fp32_wer": _r(wer.get("base_fp32")), "max_wer_degradation": max_deg, "confidence": confidence,
            "references": list(references), "differences": differences,
            "needed_utterances": max(needed) if needed else None, "reasons": reasons}


def _r(x: Optional[float]) -> Optional[float]:
    return None if x is None else round(x, 3)


def utterance_errors(ref_norm: str, hyp_norm: str) -> tuple[int, int, int, int]:
    """(word errors, reference words, char errors, reference chars) of one normalized pair, as
    steps/evaluate.py `score` counts them: jiwer edit operations; an empty reference makes every
    hypothesis word (and char) an insertion."""
    import jiwer

    if not ref_norm:
        return len(hyp_norm.split()), 0, len(hyp_norm), 0
    o = jiwer.process_words(ref_norm, hyp_norm)
    oc = jiwer.process_characters(ref_norm, hyp_norm)
    return (o.substitutions + o.deletions + o.insertions, o.hits + o.substitutions + o.deletions,
            oc.substitutions + oc.deletions + oc.insertions, oc.hits + oc.substitutions + oc.deletions)
