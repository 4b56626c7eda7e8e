"""Step evaluate: WER/CER of every model variant on prepare/test, and the quantization quality gate.

Variants: base_fp32 (PyTorch, cfg.model), qat_fp32 (PyTorch, train/model) and every ONNX export
directory in convert/ (qat_int8, base_ptq_int8, ...; an ONNX dir whose name clashes with a PyTorch
variant gets "onnx_" before "fp32": convert/qat_fp32 -> qat_onnx_fp32). Missing ones are skipped
and listed. Both sides are normalized (contract/normalize.py); WER and CER are corpus rates (errors
summed over all utterances), in percent, with 95 % percentile bootstrap intervals over utterances.
"""
from __future__ import annotations

import csv
import gc
import os
from dataclasses import dataclass
from pathlib import Path

import jiwer
import numpy as np

from contract.normalize import normalize_french
from contract.quality import gate_rule

from .audio_store import to_float
from .common import StepContext, StepError
from .inference import load_variant

# Clips per generate call. ONNX models get one clip per call, as served: their int8 activations
# are quantized with one dynamic range per call (ORT DynamicQuantizeLinear), so a batch would let
# one clip's outliers coarsen its neighbours' quantization, which QAT did not train for.
BATCH_SIZE = {"pytorch": 8, "onnx": 1}


@dataclass
class Scores:
    """Per-utterance error counts; corpus rates are sums of errors over sums of reference lengths."""
    word_errors: np.ndarray
    words: np.ndarray
    char_errors: np.ndarray
    chars: np.ndarray

    @staticmethod
    def rate(errors: np.ndarray, total: np.ndarray) -> float:
        return float(100.0 * errors.sum() / max(total.sum(), 1))

    @property
    def wer(self) -> float:
        return self.rate(self.word_errors, self.words)

    @property
    def cer(self) -> float:
        return self.rate(self.char_errors, self.chars)

    def bootstrap(self, samples: int, seed: int = 0) -> dict[str, list[float]]:
        """95 % percentile intervals of corpus WER and CER, resampling utterances."""
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, len(self.words), size=(samples, len(self.words)))
        out = {}
        for name, err, tot in (("wer", self.word_errors, self.words), ("cer", self.char_errors, self.chars)):
            rates = 100.0 * err[idx].sum(axis=1) / np.maximum(tot[idx].sum(axis=1), 1)
            out[name] = [round(float(np.percentile(rates, 2.5)), 3), round(float(np.percentile(rates, 97.5)), 3)]
        return out


def score(refs_norm: list[str], hyps_norm: list[str]) -> Scores:
    we, w, ce, c = [], [], [], []
    for ref, hyp in zip(refs_norm, hyps_norm):
        if ref:
            o = jiwer.process_words(ref, hyp)
            we.append(o.substitutions + o.deletions + o.insertions)
            w.append(o.hits + o.substitutions + o.deletions)
            oc = jiwer.process_characters(ref, hyp)
            ce.append(oc.substitutions + oc.deletions + oc.insertions)
            c.append(oc.hits + oc.substitutions + oc.deletions)
        else:  # nothing to say: every hypothesis word is an insertion
            we.append(len(hyp.split()))
            w.append(0)
            ce.append(len(hyp))
            c.append(0)
    return Scores(*(np.asarray(x, dtype=np.int64) for x in (we, w, ce, c)))


def find_variants(ctx: StepContext) -> tuple[list[tuple[str, str, str]], list[str]]:
    """([(name, path, kind)], [missing descriptions])."""
    variants = [("base_fp32", ctx.cfg.model.name_or_path, "pytorch")]
    missing = []
    qat_model = ctx.workdir / "train" / "model"
    if (qat_model / "config.json").is_file():
        variants.append(("qat_fp32", str(qat_model), "pytorch"))
    else:
        missing.append(f"qat_fp32 ({qat_model} not found: run the train step)")
    convert = ctx.workdir / "convert"
    onnx_dirs = sorted(d for d in convert.iterdir() if d.is_dir() and any(d.glob("encoder_model*.onnx"))) if convert.is_dir() else []
    if not onnx_dirs:
        missing.append(f"ONNX variants (no export directories in {convert}: run the convert step)")
    taken = {v[0] for v in variants}
    for d in onnx_dirs:
        name = d.name.replace("fp32", "onnx_fp32") if d.name in taken else d.name
        variants.append((name, str(d), "onnx"))
    return variants, missing


def gate(cfg, wer: dict[str, float]) -> dict:
    """Passed iff qat_<scheme> <= qat_fp32 + max_wer_degradation and qat_<scheme> <= base_ptq_<scheme>
    (contract/quality.py `gate_rule`, the rule the orchestrator applies again at home)."""
    return gate_rule(cfg.quant.scheme, cfg.eval.max_wer_degradation, wer)


def write_utterances(path: Path, ids, refs, hyps, refs_n, hyps_n, s: Scores) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "reference", "hypothesis", "reference_normalized", "hypothesis_normalized", "errors", "words",
                    "char_errors", "chars"])
        for row in zip(ids, refs, hyps, refs_n, hyps_n, s.word_errors, s.words, s.char_errors, s.chars):
            w.writerow([*row[:5], *(int(x) for x in row[5:])])


def run(ctx: StepContext) -> dict:
    import torch
    from datasets import load_from_disk

    cfg = ctx.cfg
    test = load_from_disk(str(ctx.dir_of("prepare") / "test"))
    if len(test) == 0:
        raise StepError("prepare/test is empty: nothing to evaluate; check data.* in the config")
    ids, refs = test["id"], test["text"]
    audios = [to_float(a) for a in test.with_format("numpy", columns=["audio"])["audio"]]
    refs_n = [normalize_french(r) for r in refs]
    variants, missing = find_variants(ctx)
    for m in missing:
        ctx.log(f"skipping {m}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = max(1, os.cpu_count() or 1)
    metrics: dict = {"wer": {}, "cer": {}, "wer_ci": {}, "cer_ci": {}, "n_utterances": len(test),
                     "variants": {}, "missing": missing}
    done, total = 0, len(variants) * len(audios)
    for name, path, kind in variants:
        ctx.log(f"{name}: transcribing {len(audios)} clips with {kind} model {path}")
        t = load_variant(path, kind, threads=threads, device=device if kind == "pytorch" else "cpu",
                         language=cfg.model.language, task=cfg.model.task)
        hyps: list[str] = []
        bs = BATCH_SIZE[kind]
        for start in range(0, len(audios), bs):
            chunk = audios[start:start + bs]
            hyps += t.transcribe(chunk, cfg.eval.max_new_tokens, bs)
            done += len(chunk)
            ctx.progress(done, total, variant=name)
        del t
        gc.collect()
        hyps_n = [normalize_french(h) for h in hyps]
        s = score(refs_n, hyps_n)
        ci = s.bootstrap(cfg.eval.bootstrap_samples)
        metrics["wer"][name], metrics["cer"][name] = round(s.wer, 3), round(s.cer, 3)
        metrics["wer_ci"][name], metrics["cer_ci"][name] = ci["wer"], ci["cer"]
        metrics["variants"][name] = {"path": path, "kind": kind}
        out = ctx.out / f"utterances_{name}.csv"
        write_utterances(out, ids, refs, hyps, refs_n, hyps_n, s)
        ctx.add_output(out)
        ctx.log(f"{name}: WER {s.wer:.2f} % {ci['wer']}, CER {s.cer:.2f} %")
    metrics["gate"] = gate(cfg, metrics["wer"])
    verdict = "PASSED" if metrics["gate"]["passed"] else "FAILED: " + "; ".join(metrics["gate"]["reasons"])
    ctx.log(f"quality gate {verdict}")
    return metrics
