"""The run's results, computed once: the variants, the results table and the quality-gate sentence.

The report (tasks/report.py), the model card (tasks/model_card.py) and the gate (tasks/gate.py)
all read them from here, so a figure or a verdict can only be written one way. Pure functions of
the steps' result.json `metrics` (see `step_metrics`); no Prefect, no I/O. A figure that was not
measured stays None in the table and reads NOT_MEASURED, never guessed.

Everything here comes from the rented machine, a stranger's computer: a variant name is shown only
when it is a known one (contract/catalogue.py KNOWN_VARIANTS), a metric key only when it is plain
lowercase words, and any other string it sent (execution provider, why a device was skipped, node
placement, a reason) goes through `md_text`, which leaves no markdown, HTML, link or image in it.
WER, CER and their intervals are the ones home recomputed (tasks/verdict.py `verified_metrics`);
sizes, speeds, latency and memory cannot be checked at home and say so (ON_MACHINE).
"""
from __future__ import annotations

import re
from typing import Any, Optional

from contract.catalogue import KNOWN_VARIANTS, STEPS, ptq_variant, quantized_variant

NOT_MEASURED = "not measured"
ON_MACHINE = ("¹ measured on the rented machine and not checked at home (size, latency, speed-up, memory); "
              "WER, CER and the WER interval are recomputed at home from its transcripts against the test set home holds.")
# The PyTorch fp32 model whose CPU latency the results table's speed-up is relative to, in order of preference.
SPEED_REFERENCES = ("base_fp32", "qat_fp32")
# Per device, the serving table's baseline (the guide's fp16 on a GPU; fp32 on a CPU, where fp16
# is no serving path) and the labels of the devices bench measures (steps/bench.py sections).
SERVING_BASELINE = {"cpu": "qat_fp32", "cuda": "qat_fp16"}
DEVICE_LABELS = {"cpu": "CPU", "cuda": "GPU (CUDA)"}
# convert/ names its folders by model ("qat_fp32" is the ONNX export there) and records the PyTorch
# weights as "pytorch_fp32"; bench and evaluate name variants. Convert's names -> variant names:
_CONVERT_TO_VARIANT = {"qat_fp32": "qat_onnx_fp32", "base_fp32": "base_onnx_fp32", "pytorch_fp32": "qat_fp32"}
_OTHER_LABELS = {"base_onnx_fp32": "baseline, ONNX fp32 export", "qat_onnx_fp32": "QAT-trained model, ONNX fp32 export",
                 "faster_whisper_int8": "faster-whisper int8 (CTranslate2)"}


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff]+")
_URL = re.compile(r"(?i)\b(?:https?|ftp|file|javascript|vbscript|data|mailto):\S*|\bwww\.\S*")
_TAG = re.compile(r"<[^>]*>?")
_MD = re.compile(r"([\\`*_{}\[\]|~>])")
_LEADING = re.compile(r"^([#+=-]|[0-9]+[.)])")
METRIC_KEY = re.compile(r"[a-z][a-z0-9_]{0,39}")


def md_text(value: Any, limit: int = 160) -> str:
    """A string the machine sent, safe as plain text in markdown: one line, no control characters,
    no link or image (URLs become "(link removed)"), no HTML, markdown characters escaped."""
    text = _CONTROL.sub(" ", str(value))
    text = _TAG.sub("", _URL.sub("(link removed)", text))
    text = " ".join(text.split())[:limit]
    text = text.replace("&", "&amp;").replace("<", "&lt;")
    return _LEADING.sub(lambda m: m.group(1)[:-1] + "\\" + m.group(1)[-1], _MD.sub(r"\\\1", text))


def variants(scheme: str) -> list[tuple[str, str]]:
    """(variant name, label) of the comparison the model card shows, in reading order."""
    return [("base_fp32", "baseline (fp32, PyTorch)"), (ptq_variant(scheme), f"PTQ {scheme} (baseline quantized, no QAT)"),
            ("qat_fp32", "QAT-trained model, fp32 (PyTorch)"), (quantized_variant(scheme), f"**QAT {scheme} (this model)**")]


def bench_section(metrics: dict, device: str = "cpu") -> dict:
    """Bench's figures of one device, {figure: {variant: value}} (steps/bench.py `run`); {} if none."""
    return (((metrics.get("bench") or {}).get("devices") or {}).get(device)) or {}


def step_metrics(results: dict) -> dict[str, dict]:
    """{step: its result.json `metrics`} from the flow's {step: result.json} (absent steps: {})."""
    return {step: ((results or {}).get(step) or {}).get("metrics") or {} for step in STEPS}


def measured(x: Any) -> Optional[float]:
    """x as a float when it is a number (bools and None are not measurements), else None."""
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def figure(x: Any, spec: str, suffix: str = "") -> str:
    """The one way a number is written: `format(x, spec) + suffix`, or NOT_MEASURED."""
    v = measured(x)
    return NOT_MEASURED if v is None else format(v, spec) + suffix


def variant_sizes(metrics: dict) -> dict[str, float]:
    """MB on disk per variant: what convert recorded for the files it wrote (the owner of that fact),
    and bench's figure only for a variant convert did not write (faster-whisper); both measure by
    steps/model_size.py. The PyTorch fp32 size is the safetensors weights (convert's `pytorch_fp32`),
    never an ONNX fp32 export; the baseline in fp32 PyTorch has the same architecture and dtype,
    hence the same size, when nothing measured it by name."""
    recorded = {_CONVERT_TO_VARIANT.get(k, k): v for k, v in ((metrics.get("convert") or {}).get("sizes_mb") or {}).items()}
    benched = bench_section(metrics).get("size_mb") or {}
    sizes = {k: measured(v) for src in (benched, recorded) for k, v in src.items() if measured(v) is not None}
    if "base_fp32" not in sizes and "qat_fp32" in sizes:
        sizes["base_fp32"] = sizes["qat_fp32"]
    return sizes


def results_table(scheme: str, metrics: dict) -> list[dict]:
    """One row per variant: the card's comparison first (always, measured or not), then every other
    variant evaluate or bench measured. Numbers or None; `wer_ci95` is (low, high) or None;
    `speedup` is the PyTorch fp32 reference's latency over the variant's, to 2 decimals, both on the
    CPU (the GPU's figures are in `serving_rows`, each against the GPU's own baseline)."""
    ev, be = metrics.get("evaluate") or {}, bench_section(metrics, "cpu")
    wer, cer, ci, lat = (ev.get("wer") or {}), (ev.get("cer") or {}), (ev.get("wer_ci") or {}), (be.get("latency_s") or {})
    sizes = variant_sizes(metrics)
    ref = next((measured(lat.get(r)) for r in SPEED_REFERENCES if measured(lat.get(r))), None)
    shown = variants(scheme)
    others = sorted((set(wer) | set(lat) | set(be.get("size_mb") or {})) & KNOWN_VARIANTS - {name for name, _ in shown})
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
    lines = ["| variant | WER % | WER 95 % CI | CER % | size MB ¹ | latency s/clip ¹ | speed-up ¹ |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        ci = r["wer_ci95"]
        interval = f"{figure(ci[0], '.2f')} to {figure(ci[1], '.2f')}" if ci else NOT_MEASURED
        cells = [r[name], figure(r["wer_pct"], ".2f"), interval, figure(r["cer_pct"], ".2f"), figure(r["size_mb"], ".1f"),
                 figure(r["latency_s"], ".3f"), figure(r["speedup"], ".2f", "x")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + ["", ON_MACHINE]


GATE_LABELS = {"qat_fp32": "QAT fp32", "base_fp32": "the baseline fp32"}


def difference_text(d: Any, confidence: Any = None) -> str:
    """One paired difference as the report and the card print it: `+0.20 points (95 % interval -0.10
    to +0.50)`; NOT_MEASURED when it is not a measured difference."""
    d = d if isinstance(d, dict) else {}
    diff, low, high = (measured(d.get(k)) for k in ("diff", "low", "high"))
    if diff is None:
        return NOT_MEASURED
    conf = measured(confidence)
    interval = (f" ({f'{conf:.0%}'.replace('%', ' %')} interval {low:+.2f} to {high:+.2f})"
                if low is not None and high is not None and conf is not None else "")
    return f"{diff:+.2f} points{interval}"


def gate_sentence(gate: dict, scheme: str, allowed: Any = None) -> str:
    """What the gate compared, from its verdict (contract/quality.py `gate_rule`): the QAT model
    quantized minus each reference, with the paired interval the gate decided on, and minus plain
    PTQ. `allowed` stands in for a verdict that does not record its max_wer_degradation."""
    q, f, p = (measured(gate.get(k)) for k in ("qat_wer", "qat_fp32_wer", "ptq_wer"))
    allowed = gate.get("max_wer_degradation", allowed)
    diffs = gate.get("differences") if isinstance(gate.get("differences"), dict) else {}
    if q is None:
        return f"QAT {scheme} WER {figure(q, '.2f', '%')}, QAT fp32 WER {figure(f, '.2f', '%')}"
    parts = [f"QAT {scheme} WER {q:.2f}%"]
    for ref, label in (*GATE_LABELS.items(), (ptq_variant(scheme), f"plain PTQ {scheme} of the baseline")):
        if ref not in diffs:
            continue
        rule = "must be <= 0" if ref == ptq_variant(scheme) else f"upper bound allowed up to +{figure(allowed, 'g')}"
        parts.append(f"minus {label}: {difference_text(diffs[ref], gate.get('confidence'))}, {rule}")
    if len(parts) == 1:  # a verdict without paired differences
        parts.append(f"QAT fp32 WER {figure(f, '.2f', '%')} (allowed +{figure(allowed, 'g')} points)")
        if p is not None:
            parts.append(f"plain PTQ {scheme} of the baseline {p:.2f}%")
    needed = measured(gate.get("needed_utterances"))
    if gate.get("inconclusive"):
        parts.append("inconclusive: the test set is too small to decide"
                     + (f" (about {int(needed)} utterances would be needed)" if needed else ""))
    return "; ".join(parts)


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


def _quantized_on(device: str, scheme: str, figures: dict) -> list[tuple[str, str]]:
    """(variant, label) of the QAT model quantized, as each device serves it (those bench measured)."""
    q = quantized_variant(scheme)
    ep = "CUDA EP" if device == "cuda" else "CPU EP"
    rows = [(q, f"QAT {scheme}, ONNX Runtime {ep}")]
    if device == "cuda":
        rows.append((f"{q}_torchao", f"QAT {scheme}, PyTorch torchao weight-only"))
    return [(v, label) for v, label in rows if v in (figures.get("latency_s") or {})]


def serving_rows(scheme: str, metrics: dict) -> dict[str, list[dict]]:
    """The guide's table per measured device: size, memory, speed, latency, quality for the baseline
    and the QAT model quantized. Speed is the same device's baseline latency over the row's: no
    figure anywhere divides one device's time by another's. Quality is the WER evaluate measured for
    the same weights and quantization (`wer_of`: the variant it was measured as), else None."""
    wer = (metrics.get("evaluate") or {}).get("wer") or {}
    out = {}
    for device, base in SERVING_BASELINE.items():
        fig = bench_section(metrics, device)
        lat = fig.get("latency_s") or {}
        if not lat:
            continue
        ref = measured(lat.get(base))
        label = "PyTorch fp16 (baseline)" if device == "cuda" else "PyTorch fp32 (baseline)"
        rows = []
        for name, text in [(base, label)] + _quantized_on(device, scheme, fig):
            mine = measured(lat.get(name))
            # fp16 serves the fp32-evaluated weights; an ONNX model's graph is the one evaluate ran (CPU EP)
            wer_of = "qat_fp32" if name == base else (name if name in wer else None)
            memory = (fig.get("peak_vram_mb") if device == "cuda" else fig.get("peak_rss_mb")) or {}
            rows.append({"variant": name, "label": text, "device": (fig.get("device") or {}).get(name, device),
                         "provider": (fig.get("provider") or {}).get(name),
                         "size_mb": measured((fig.get("size_mb") or {}).get(name)),
                         "memory_mb": measured(memory.get(name)), "latency_s": mine,
                         "decoder_ms_per_token": measured((fig.get("decoder_ms_per_token") or {}).get(name)),
                         "rtf": measured((fig.get("rtf") or {}).get(name)),
                         "speed": round(ref / mine, 2) if ref and mine else None,
                         "wer_pct": measured(wer.get(wer_of)) if wer_of else None, "wer_of": wer_of})
        out[device] = rows
    return out


def serving_markdown(scheme: str, metrics: dict) -> list[str]:
    """One table per device (its own baseline), and the devices bench skipped with the reason."""
    lines = []
    for device, rows in serving_rows(scheme, metrics).items():
        mem = "peak VRAM MiB" if device == "cuda" else "peak RSS MiB"
        lines += [f"**{DEVICE_LABELS[device]}** (speed relative to {rows[0]['label']} on the same device; every "
                  "figure but WER measured on the rented machine, not checked at home):", "",
                  f"| variant | execution provider | size MB | {mem} | speed | latency s/clip | RTF | decoder ms/token | WER % |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            quality = figure(r["wer_pct"], ".2f") + (f" ({r['wer_of']})" if r["wer_pct"] is not None else "")
            lines.append("| " + " | ".join([r["label"], md_text(r["provider"]) if r["provider"] else NOT_MEASURED,
                                             figure(r["size_mb"], ".1f"),
                                             figure(r["memory_mb"], ".0f"), figure(r["speed"], ".2f", "x"),
                                             figure(r["latency_s"], ".3f"), figure(r["rtf"], ".3f"),
                                             figure(r["decoder_ms_per_token"], ".2f"), quality]) + " |")
        lines.append("")
        if device == "cuda":
            lines += placement_lines((metrics.get("bench") or {}).get("placement") or {})
    for device, why in ((metrics.get("bench") or {}).get("skipped") or {}).items():
        lines += [f"**{DEVICE_LABELS.get(device) or md_text(device, 40)}**: not measured ({md_text(why, 300)}).", ""]
    return lines


def placement_lines(placement: dict) -> list[str]:
    """Where ONNX Runtime ran each ONNX model's nodes on the GPU machine (a CUDA EP that lacks a
    kernel, e.g. int8 MatMulInteger, runs it on the CPU, copies included: its figures show that)."""
    lines = []
    for variant, parts in placement.items() if isinstance(placement, dict) else ():
        if variant not in KNOWN_VARIANTS or not isinstance(parts, dict):
            continue
        cells = []
        for part, p in parts.items():
            if not isinstance(p, dict):
                continue
            if "error" in p:
                cells.append(f"{md_text(part, 40)}: {md_text(p['error'], 300)}")
                continue
            counts = ", ".join(f"{md_text(n, 12)} on {md_text(ep.replace('ExecutionProvider', ''), 40)}"
                               for ep, n in p.items() if ep != "cpu_ops")
            cpu_ops = p.get("cpu_ops") if isinstance(p.get("cpu_ops"), dict) else {}
            ops = ", ".join(f"{md_text(op, 40)} {md_text(n, 12)}" for op, n in
                            sorted(cpu_ops.items(), key=lambda x: -(measured(x[1]) or 0)))
            cells.append(f"{md_text(part, 40)}: {counts}" + (f" (on the CPU: {ops})" if ops else ""))
        lines.append(f"- node placement of `{variant}` (on the rented machine): " + "; ".join(cells))
    return lines + ([""] if lines else [])
