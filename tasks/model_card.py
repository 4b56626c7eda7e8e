"""The model card (README.md) uploaded with the model: metadata + results, all from measured metrics.

Every figure comes from the `metrics` passed in (the steps' result.json, with WER, CER, their
interval and the gate replaced by what home recomputed: tasks/verdict.py `verified_metrics`) or
from the run config; the results table and the gate verdict are tasks/scorecard.py's, the same as
in the run report, and a figure that was not measured is written 'not measured', never guessed.
Figures home cannot check (sizes, speed, memory, training figures) are labelled as measured on the
rented machine; no string the machine sent is rendered as markdown (tasks/scorecard.py `md_text`).
"""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from contract.catalogue import quantized_variant
from contract.config import RunConfig
from contract.fingerprint import inputs_in_words
from contract.layout import REPO_ROOT
from contract.quant_spec import quant_spec

from .scorecard import (METRIC_KEY, figure, gate_verdict, md_text, measured, results_markdown, results_table,
                        serving_markdown, variants)

# What the card's snippet imports, pinned as pyproject.toml pins them (the int4 encoder's graph is ONNX
# opset 21: an onnxruntime older than the pin cannot load it)
SERVING_PACKAGES = ("optimum-onnx", "onnxruntime")

LANGUAGES = {"fr": "French", "en": "English", "de": "German", "es": "Spanish", "it": "Italian"}
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


# Hub datasets a base model's own card lists among its training data: its score on their test split is
# in-domain and possibly contaminated, and the card says so (docs/REFERENCE.md section 1d).
BASE_TRAINING_DATA = {"bofenghuang/whisper-large-v3-distil-fr-v0.2": ("facebook/multilingual_librispeech",)}


def is_hub_id(name_or_path: str) -> bool:
    """`owner/name` that is not a directory here: the Hub can link the card to it (`base_model`)."""
    return bool(HUB_ID.match(name_or_path)) and not Path(name_or_path).exists()


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
    if is_hub_id(cfg.model.name_or_path):  # the Hub's link to the parent model
        meta["base_model"] = cfg.model.name_or_path
    if cfg.data.source == "hf":  # the Hub's link to the data
        meta["datasets"] = [cfg.data.dataset]
    # the repo holds ONNX only: the Hub's "onnx" library, not "transformers" (whose snippet would fail)
    meta.update({"library_name": "onnx", "pipeline_tag": "automatic-speech-recognition",
                 "tags": ["whisper", "onnx", scheme, "qat", "quantization-aware-training", "optimum", "onnxruntime"]})
    results = []
    for key, label in (("wer", "WER"), ("cer", "CER")):
        v = measured((ev.get(key) or {}).get(quantized_variant(scheme)))
        if v is not None:
            results.append({"type": key, "value": round(v, 2), "name": f"Test {label} (%)"})
    if results:
        meta["model-index"] = [{
            "name": (cfg.hub.repo_id or cfg.name).split("/")[-1],
            "results": [{"task": {"type": "automatic-speech-recognition", "name": "Automatic Speech Recognition"},
                         "dataset": _dataset(cfg), "metrics": results}]}]
    return meta


def _card_rows(cfg: RunConfig, metrics: dict) -> list[dict]:
    """The scorecard's rows for the card's comparison (baseline, PTQ, QAT fp32, this model)."""
    shown = {name for name, _ in variants(cfg.quant.scheme)}
    return [r for r in results_table(cfg.quant.scheme, metrics) if r["variant"] in shown]


def _training_lines(cfg: RunConfig, train: dict) -> list[str]:
    t = cfg.train
    lines = [f"- {t.length}, learning rate {t.learning_rate:g}, batch {t.per_device_batch_size} x {t.grad_accum} "
             f"accumulation, warm-up {t.warmup_steps} steps, weight decay {t.weight_decay:g}"
             + (", encoder frozen" if t.freeze_encoder else "")]
    recorded = [(k, v) for k, v in sorted(train.items())
                if isinstance(k, str) and METRIC_KEY.fullmatch(k) and measured(v) is not None]
    if recorded:
        lines.append("- as the rented machine reported them (not checked at home): "
                     + "; ".join(f"{k.replace('_', ' ')} {figure(v, '.4g')}" for k, v in recorded))
    return lines


def serving_requirements() -> list[str]:
    """The requirement strings of SERVING_PACKAGES, read from pyproject.toml (their one owner; the
    checkout's, which push_code also sends before anything is rented)."""
    import tomllib

    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {re.split(r"[<>=~!\[; ]", d, maxsplit=1)[0].lower(): d for d in deps}
    return [pins[name] for name in SERVING_PACKAGES]


def render_model_card(cfg: RunConfig, metrics: dict, history: list[str] = ()) -> str:
    """README.md text: YAML metadata (model-index with the measured test WER/CER) + the body.

    `metrics`: {"evaluate": {...}, "bench": {...}, "train": {...}, "convert": {...}} (each a step's
    result.json `metrics`; any may be missing). `history`: markdown lines placed after the usage
    (tasks/champion.py `card_lines`: the comparison with the published model, the previous commits)."""
    scheme, d = cfg.quant.scheme, cfg.data
    ev, train = metrics.get("evaluate") or {}, metrics.get("train") or {}
    repo = cfg.hub.repo_id or f"<owner>/{cfg.name}"
    base = cfg.model.name_or_path
    base_link = f"[`{base}`](https://huggingface.co/{base})" if is_hub_id(base) else f"`{base}`"
    scheme_text = quant_spec(cfg.quant).describe()
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
             *_training_lines(cfg, train),
             *(f"- {what.capitalize()}: {md_text(text, 300)}" for what, text in inputs_in_words(cfg).items()), "",
             "## Results", "",
             f"Test split `{d.test_split}` of {source}. WER and CER in percent after text normalization (corpus level, "
             "95 % bootstrap interval on WER); size on disk is the weights (safetensors for PyTorch, ONNX files with "
             "their external data); latency is seconds per clip measured by the bench step "
             f"on the CPU ({cfg.bench.threads} threads); speed-up is relative to the model in fp32 PyTorch on the same CPU.", "",
             *results_markdown(_card_rows(cfg, metrics)), "",
             "### Serving, per device", "",
             "Each device against its own baseline, never one device's time over another's; memory is what a fresh "
             "process holds after one clip; decoder ms/token over forced tokens.", "",
             *serving_markdown(scheme, metrics)]
    if measured(ev.get("n_utterances")) is not None:
        lines += ["", f"Scored on {int(ev['n_utterances'])} test utterances."]
    lines += ["", gate_verdict(ev.get("gate") or {}, scheme, cfg.eval.max_wer_degradation), "",
              "## How to use", "",
              "Install: `pip install " + " ".join(f'"{r}"' for r in serving_requirements()) + "`", "",
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
    lines += list(history)
    if cfg.hub.private:
        lines += ["The repository is private: log in first (`hf auth login`) or pass `token=...`.", ""]
    if d.source == "hf" and d.dataset in BASE_TRAINING_DATA.get(base, ()):
        lines += ["## Limitations", "",
                  f"The base model's card lists `{d.dataset}` among its training data: its score on this test split "
                  "is probably optimistic (not a held-out figure), and so may be the fine-tuned variants'. Compare "
                  "the variants with each other, and measure on your own audio before relying on them.", ""]
    if d.source != "hf":
        lines += ["## Limitations", "",
                  "These figures come from a local test set, not from a public benchmark; measure on your own "
                  "audio before relying on them.", ""]
    return "\n".join(lines)
