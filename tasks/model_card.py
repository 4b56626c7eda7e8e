"""The model card (README.md) uploaded with the model: metadata + results, all from measured metrics.

Every figure comes from the `metrics` passed in (the steps' result.json) or from the run config;
a figure that was not measured is written 'not measured', never guessed.
"""
from __future__ import annotations

import re
from typing import Any, Optional

import yaml

from steps.config import RunConfig

NOT_MEASURED = "not measured"
LANGUAGES = {"fr": "French", "en": "English", "de": "German", "es": "Spanish", "it": "Italian"}
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
SCHEMES = {
    "int8": ("int8 weights per output channel, symmetric, with dynamic uint8 activations: the grid of "
             "ONNX Runtime's quantize_dynamic"),
    "int4": ("int4 weights, symmetric, in blocks of {group_size} inputs, float activations: the grid of "
             "ONNX Runtime's MatMulNBits"),
}


def _num(x: Any) -> Optional[float]:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _fmt(x: Any, spec: str, suffix: str = "") -> str:
    v = _num(x)
    return NOT_MEASURED if v is None else format(v, spec) + suffix


def variants(scheme: str) -> list[tuple[str, str]]:
    """(variant name, label) rows of the results table, in reading order."""
    return [("base_fp32", "baseline (fp32, PyTorch)"), (f"base_ptq_{scheme}", f"PTQ {scheme} (baseline quantized, no QAT)"),
            ("qat_fp32", "QAT-trained model, fp32 (PyTorch)"), (f"qat_{scheme}", f"**QAT {scheme} (this model)**")]


def _dataset(cfg: RunConfig) -> dict:
    d = cfg.data
    if d.source == "hf":
        out = {"name": f"{d.dataset} ({d.config})" if d.config else d.dataset, "type": d.dataset, "split": d.test_split}
        if d.config:
            out["config"] = d.config
        return out
    return {"name": f"local manifest {d.manifest}", "type": "manifest", "split": d.test_split}


def _front_matter(cfg: RunConfig, metrics: dict) -> dict:
    scheme, ev = cfg.quant.scheme, metrics.get("evaluate") or {}
    meta: dict = {"license": cfg.hub.license, "language": [cfg.model.language]}
    if HUB_ID.match(cfg.model.name_or_path):
        meta["base_model"] = cfg.model.name_or_path
    if cfg.data.source == "hf":
        meta["datasets"] = [cfg.data.dataset]
    meta.update({"library_name": "transformers", "pipeline_tag": "automatic-speech-recognition",
                 "tags": ["whisper", "onnx", scheme, "qat", "quantization-aware-training", "optimum", "onnxruntime"]})
    results = []
    for key, label in (("wer", "WER"), ("cer", "CER")):
        v = _num((ev.get(key) or {}).get(f"qat_{scheme}"))
        if v is not None:
            results.append({"type": key, "value": round(v, 2), "name": f"Test {label} (%)"})
    if results:
        meta["model-index"] = [{
            "name": (cfg.hub.repo_id or cfg.name).split("/")[-1],
            "results": [{"task": {"type": "automatic-speech-recognition", "name": "Automatic Speech Recognition"},
                         "dataset": _dataset(cfg), "metrics": results}]}]
    return meta


def results_rows(cfg: RunConfig, metrics: dict) -> list[dict]:
    """Per variant: WER, CI, CER, size, latency, speed-up vs base_fp32; strings, 'not measured' when absent."""
    ev, be, cv = (metrics.get(k) or {} for k in ("evaluate", "bench", "convert"))
    # Bench names variants as evaluate does (qat_fp32 = PyTorch); convert names its directories.
    sizes = {k: v for src in (cv.get("sizes_mb"), be.get("sizes_mb"), be.get("size_mb")) for k, v in (src or {}).items()
             if _num(v) is not None}  # later sources win: what bench measured per variant
    lat = be.get("latency_s") or {}
    ref = _num(lat.get("base_fp32")) or _num(lat.get("qat_fp32"))  # PyTorch fp32: the speed reference
    rows = []
    for name, label in variants(cfg.quant.scheme):
        ci = (ev.get("wer_ci") or {}).get(name)
        mine = _num(lat.get(name))
        rows.append({
            "variant": name, "label": label,
            "wer": _fmt((ev.get("wer") or {}).get(name), ".2f"),
            "wer_ci": (f"{_fmt(ci[0], '.2f')} to {_fmt(ci[1], '.2f')}"
                       if isinstance(ci, (list, tuple)) and len(ci) == 2 and None not in map(_num, ci) else NOT_MEASURED),
            "cer": _fmt((ev.get("cer") or {}).get(name), ".2f"),
            "size": _fmt(sizes.get(name), ".1f"),
            "latency": _fmt(mine, ".3f"),
            "speedup": _fmt(ref / mine, ".2f", "x") if ref and mine else NOT_MEASURED,
        })
    return rows


def _gate_text(cfg: RunConfig, gate: dict) -> str:
    if not gate or "passed" not in gate:
        return f"Quality gate: {NOT_MEASURED}."
    scheme = cfg.quant.scheme
    allowed = gate.get("max_wer_degradation", cfg.eval.max_wer_degradation)
    verdict = "**passed**" if gate["passed"] else "**FAILED**"
    text = (f"Quality gate {verdict}: QAT {scheme} WER {_fmt(gate.get('qat_wer'), '.2f', ' %')} against the QAT fp32 "
            f"export's {_fmt(gate.get('qat_fp32_wer'), '.2f', ' %')}, at most {_fmt(allowed, 'g')} WER points lost allowed")
    if _num(gate.get("ptq_wer")) is not None:
        text += f"; plain PTQ {scheme} of the baseline: {_fmt(gate['ptq_wer'], '.2f', ' %')}"
    reasons = [str(r) for r in gate.get("reasons") or []]
    return text + "." + ("".join(f"\n- {r}" for r in reasons) if reasons and not gate["passed"] else "")


def _training_lines(cfg: RunConfig, train: dict) -> list[str]:
    t = cfg.train
    lines = [f"- {t.length}, learning rate {t.learning_rate:g}, batch {t.per_device_batch_size} x {t.grad_accum} "
             f"accumulation, warm-up {t.warmup_steps} steps, weight decay {t.weight_decay:g}"
             + (", encoder frozen" if t.freeze_encoder else "")]
    measured = [(k, v) for k, v in sorted(train.items()) if _num(v) is not None]
    lines += [f"- {k.replace('_', ' ')}: {_fmt(v, '.4g')}" for k, v in measured]
    return lines


def render_model_card(cfg: RunConfig, metrics: dict) -> str:
    """README.md text: YAML metadata (model-index with the measured test WER/CER) + the body.

    `metrics`: {"evaluate": {...}, "bench": {...}, "train": {...}, "convert": {...}} (each a step's
    result.json `metrics`; any may be missing)."""
    scheme, d = cfg.quant.scheme, cfg.data
    ev, train = metrics.get("evaluate") or {}, metrics.get("train") or {}
    repo = cfg.hub.repo_id or f"<owner>/{cfg.name}"
    base = cfg.model.name_or_path
    base_link = f"[`{base}`](https://huggingface.co/{base})" if HUB_ID.match(base) else f"`{base}`"
    scheme_text = SCHEMES[scheme].format(group_size=cfg.quant.group_size)
    source = (f"`{d.dataset}`" + (f" (config `{d.config}`)" if d.config else "")) if d.source == "hf" else f"the local manifest `{d.manifest}`"

    lines = ["---", yaml.safe_dump(_front_matter(cfg, metrics), sort_keys=False, allow_unicode=True).strip(), "---", "",
             f"# {repo.split('/')[-1]}", "",
             f"{base_link} (credit to its authors) fine-tuned with **quantization-aware training (QAT)** for "
             f"**{scheme}** and exported to ONNX for onnxruntime, for {LANGUAGES.get(cfg.model.language, cfg.model.language)} speech recognition "
             f"({cfg.model.task}).", "",
             "## What was done", "",
             f"- QAT: the encoder and decoder block linear layers were fine-tuned through fake quantization "
             f"({scheme_text}), so the weights learn to live with the rounding; the exported {scheme} ONNX model "
             "applies the same quantization for real.",
             f"- Training data: {source}, split `{d.train_split}`, up to {d.max_samples} examples; dev split "
             f"`{d.dev_split}`; test split `{d.test_split}`, up to {d.max_eval_samples} examples, never used in training.",
             *_training_lines(cfg, train), "",
             "## Results", "",
             f"Test split `{d.test_split}` of {source}. WER and CER in percent after text normalization (corpus level, "
             "95 % bootstrap interval on WER); size on disk includes external ONNX data; latency is seconds per clip "
             f"measured by the bench step ({cfg.bench.threads} threads); speed-up is relative to the fp32 baseline.", "",
             "| variant | WER % | WER 95 % CI | CER % | size MB | latency s/clip | speed-up |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in results_rows(cfg, metrics):
        lines.append(f"| {r['label']} | {r['wer']} | {r['wer_ci']} | {r['cer']} | {r['size']} | {r['latency']} | {r['speedup']} |")
    if _num(ev.get("n_utterances")) is not None:
        lines += ["", f"Scored on {int(ev['n_utterances'])} test utterances."]
    lines += ["", _gate_text(cfg, ev.get("gate") or {}), "",
              "## How to use", "",
              "```python",
              "from optimum.onnxruntime import ORTModelForSpeechSeq2Seq",
              "from transformers import AutoProcessor",
              "",
              f'model = ORTModelForSpeechSeq2Seq.from_pretrained("{repo}")',
              f'processor = AutoProcessor.from_pretrained("{repo}")',
              f"# audio: mono speech as float samples at {d.sampling_rate} Hz",
              f'inputs = processor(audio, sampling_rate={d.sampling_rate}, return_tensors="pt")',
              f'ids = model.generate(inputs.input_features, language="{cfg.model.language}", task="{cfg.model.task}")',
              "print(processor.batch_decode(ids, skip_special_tokens=True))",
              "```", ""]
    if cfg.hub.private:
        lines += ["The repository is private: log in first (`hf auth login`) or pass `token=...`.", ""]
    if d.source != "hf":
        lines += ["## Limitations", "",
                  "These figures come from a local test set, not from a public benchmark; measure on your own "
                  "audio before relying on them.", ""]
    return "\n".join(lines)
