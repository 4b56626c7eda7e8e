"""The run's results, computed once: the variants, the results table and the quality-gate sentence.

The report (tasks/report.py), the model card (tasks/model_card.py) and the gate (tasks/gate.py)
all read them from here, so a figure or a verdict can only be written one way. Pure functions of
the steps' result.json `metrics` (see `step_metrics`); no Prefect, no I/O. A figure that was not
measured stays None in the table and reads NOT_MEASURED, never guessed.
"""
from __future__ import annotations

from typing import Any, Optional

from contract.catalogue import ptq_variant, quantized_variant

NOT_MEASURED = "not measured"
# The PyTorch fp32 model whose latency every speed-up is relative to, in order of preference.
SPEED_REFERENCES = ("base_fp32", "qat_fp32")
# convert/ names its folders by model ("qat_fp32" is the ONNX export there) and records the PyTorch
# weights as "pytorch_fp32"; bench and evaluate name variants. Convert's names -> variant names:
_CONVERT_TO_VARIANT = {"qat_fp32": "qat_onnx_fp32", "base_fp32": "base_onnx_fp32", "pytorch_fp32": "qat_fp32"}
_OTHER_LABELS = {"base_onnx_fp32": "baseline, ONNX fp32 export", "qat_onnx_fp32": "QAT-trained model, ONNX fp32 export",
                 "faster_whisper_int8": "faster-whisper int8 (CTranslate2)"}


def variants(scheme: str) -> list[tuple[str, str]]:
    """(variant name, label) of the comparison the model card shows, in reading order."""
    return [("base_fp32", "baseline (fp32, PyTorch)"), (ptq_variant(scheme), f"PTQ {scheme} (baseline quantized, no QAT)"),
            ("qat_fp32", "QAT-trained model, fp32 (PyTorch)"), (quantized_variant(scheme), f"**QAT {scheme} (this model)**")]


def step_metrics(results: dict) -> dict[str, dict]:
    """{step: its result.json `metrics`} from the flow's {step: result.json} (absent steps: {})."""
    return {step: ((results or {}).get(step) or {}).get("metrics") or {}
            for step in ("train", "convert", "bench", "evaluate")}


def measured(x: Any) -> Optional[float]:
    """x as a float when it is a number (bools and None are not measurements), else None."""
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def figure(x: Any, spec: str, suffix: str = "") -> str:
    """The one way a number is written: `format(x, spec) + suffix`, or NOT_MEASURED."""
    v = measured(x)
    return NOT_MEASURED if v is None else format(v, spec) + suffix


def variant_sizes(metrics: dict) -> dict[str, float]:
    """MB on disk per variant, from one rule: what bench measured for the variant it ran, else what
    convert recorded for the same files. The PyTorch fp32 size is the safetensors weights (bench's
    `qat_fp32`, convert's `pytorch_fp32`), never an ONNX fp32 export; the baseline in fp32 PyTorch
    has the same architecture and dtype, hence the same size, when nothing measured it by name."""
    recorded = {_CONVERT_TO_VARIANT.get(k, k): v for k, v in ((metrics.get("convert") or {}).get("sizes_mb") or {}).items()}
    benched = (metrics.get("bench") or {}).get("size_mb") or {}
    sizes = {k: measured(v) for src in (recorded, benched) for k, v in src.items() if measured(v) is not None}
    if "base_fp32" not in sizes and "qat_fp32" in sizes:
        sizes["base_fp32"] = sizes["qat_fp32"]
    return sizes


def results_table(scheme: str, metrics: dict) -> list[dict]:
    """One row per variant: the card's comparison first (always, measured or not), then every other
    variant evaluate or bench measured. Numbers or None; `wer_ci95` is (low, high) or None;
    `speedup` is the PyTorch fp32 reference's latency over the variant's, to 2 decimals."""
    ev, be = metrics.get("evaluate") or {}, metrics.get("bench") or {}
    wer, cer, ci, lat = (ev.get("wer") or {}), (ev.get("cer") or {}), (ev.get("wer_ci") or {}), (be.get("latency_s") or {})
    sizes = variant_sizes(metrics)
    ref = next((measured(lat.get(r)) for r in SPEED_REFERENCES if measured(lat.get(r))), None)
    shown = variants(scheme)
    others = sorted((set(wer) | set(lat) | set(be.get("size_mb") or {})) - {name for name, _ in shown})
    rows = []
    for name, label in shown + [(v, _OTHER_LABELS.get(v, v)) for v in others]:
        interval = ci.get(name)
        mine = measured(lat.get(name))
        rows.append({
            "variant": name, "label": label,
            "wer_pct": measured(wer.get(name)), "cer_pct": measured(cer.get(name)),
            "wer_ci95": (tuple(map(float, interval)) if isinstance(interval, (list, tuple)) and len(interval) == 2
                         and None not in map(measured, interval) else None),
            "size_mb": sizes.get(name), "latency_s": mine,
            "speedup": round(ref / mine, 2) if ref and mine else None,
        })
    return rows


def results_markdown(rows: list[dict], name: str = "label") -> list[str]:
    """The results table as Markdown lines; `name` picks the first column ("label" or "variant")."""
    lines = ["| variant | WER % | WER 95 % CI | CER % | size MB | latency s/clip | speed-up |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        ci = r["wer_ci95"]
        interval = f"{figure(ci[0], '.2f')} to {figure(ci[1], '.2f')}" if ci else NOT_MEASURED
        cells = [r[name], figure(r["wer_pct"], ".2f"), interval, figure(r["cer_pct"], ".2f"), figure(r["size_mb"], ".1f"),
                 figure(r["latency_s"], ".3f"), figure(r["speedup"], ".2f", "x")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def gate_sentence(gate: dict, scheme: str, allowed: Any = None) -> str:
    """What the gate compared, from the verdict evaluate recorded (steps/evaluate.py `gate`):
    the QAT model quantized against the QAT model in fp32 PyTorch, and against plain PTQ.
    `allowed` stands in for a verdict that does not record its max_wer_degradation."""
    q, f, p = (measured(gate.get(k)) for k in ("qat_wer", "qat_fp32_wer", "ptq_wer"))
    allowed = gate.get("max_wer_degradation", allowed)
    if q is None or f is None:
        text = f"QAT {scheme} WER {figure(q, '.2f', '%')}, QAT fp32 WER {figure(f, '.2f', '%')}"
    else:
        text = f"QAT {scheme} WER {q:.2f}% vs QAT fp32 {f:.2f}% (allowed +{figure(allowed, 'g')} points)"
    return text + (f"; plain PTQ {scheme} of the baseline {p:.2f}%" if p is not None else "")


def gate_verdict(gate: dict, scheme: str, allowed: Any = None) -> str:
    """The verdict as the report and the card print it, with the failing reasons under it.

    The gate task keeps its sentence as `reason` (it may say why there is no verdict at all);
    evaluate's raw verdict has none, so the sentence is written from its numbers."""
    if not gate or "passed" not in gate:
        return f"Quality gate: {NOT_MEASURED}."
    verdict = "**passed**" if gate["passed"] else "**FAILED**"
    text = f"Quality gate {verdict}: {gate.get('reason') or gate_sentence(gate, scheme, allowed)}."
    reasons = [str(r) for r in gate.get("reasons") or []]
    return text + ("".join(f"\n- {r}" for r in reasons) if reasons and not gate["passed"] else "")
