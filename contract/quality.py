"""How a transcript is scored and how the quality gate decides: one rule, used by both sides.

The evaluate step applies it on the machine (steps/evaluate.py); the orchestrator applies it again
at home to the per-utterance transcripts the machine sent back (tasks/verdict.py), so the verdict
that decides an upload is never just the machine's word.

    passed  iff  qat_<scheme> <= qat_fp32 + max_wer_degradation  and  qat_<scheme> <= base_ptq_<scheme>

WERs are corpus rates in percent (errors summed over utterances / reference words summed).
"""
from __future__ import annotations

from typing import Mapping, Optional

from .catalogue import ptq_variant, quantized_variant


def gate_rule(scheme: str, max_wer_degradation: float, wer: Mapping[str, Optional[float]]) -> dict:
    """The quality gate over {variant: WER %}: {"passed", "scheme", "qat_wer", "qat_fp32_wer",
    "ptq_wer", "max_wer_degradation", "reasons"}. A missing quantized or fp32 QAT variant fails;
    a missing PTQ variant skips that comparison."""
    qname, pname = quantized_variant(scheme), ptq_variant(scheme)
    qat, fp32, ptq = wer.get(qname), wer.get("qat_fp32"), wer.get(pname)
    max_deg = max_wer_degradation
    reasons = []
    if qat is None:
        reasons.append(f"{qname} was not evaluated")
    if fp32 is None:
        reasons.append("qat_fp32 was not evaluated")
    if qat is not None and fp32 is not None and qat > fp32 + max_deg:
        reasons.append(f"{qname} WER {qat:.2f} > qat_fp32 WER {fp32:.2f} + {max_deg}")
    if qat is not None and ptq is not None and qat > ptq:
        reasons.append(f"{qname} WER {qat:.2f} > {pname} WER {ptq:.2f}")
    return {"passed": not reasons, "scheme": scheme, "qat_wer": qat, "qat_fp32_wer": fp32, "ptq_wer": ptq,
            "max_wer_degradation": max_deg, "reasons": reasons}


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


def corpus_rate(errors: int, total: int) -> float:
    """Percent, as steps/evaluate.py `Scores.rate`: errors over max(total, 1)."""
    return float(100.0 * errors / max(total, 1))
