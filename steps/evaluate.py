"""Step evaluate: WER/CER of every model variant on prepare/test, and the quantization quality gate.

Variants: base_fp32 (PyTorch, cfg.model), qat_fp32 (PyTorch, train/model) and every ONNX export
directory in convert/ (qat_int8, base_ptq_int8, ...; an ONNX dir whose name clashes with a PyTorch
variant gets "onnx_" before "fp32": convert/qat_fp32 -> qat_onnx_fp32). Missing ones are skipped
and listed.

On a GPU (eval.quantized_on auto/fake_quant) an ONNX variant with a PyTorch twin (qat_<scheme> and
base_ptq_<scheme>: the fake-quantized model the export is bit-true to, tests/test_parity.py; the fp32
exports: the plain model) is scored from that twin on the GPU, one clip per call as served, and the
export itself must give the same tokens on the first eval.onnx_check_clips clips (ONNX Runtime, CPU);
where it does not, the variant is scored from the export as on a CPU machine, and the report says
why. Not ONNX Runtime's CUDA EP: it has no kernel for the int8 export's DynamicQuantizeLinear and
MatMulInteger(uint8, int8), so the int8 matmuls would still run on the CPU.

Both sides are normalized (contract/normalize.py); WER and CER are corpus rates (errors summed
over all utterances), in percent, with 95 % percentile bootstrap intervals over utterances.
"""
from __future__ import annotations

import csv
import gc
import os
from dataclasses import dataclass
from pathlib import Path

import jiwer
import numpy as np

from contract.catalogue import ptq_variant, quantized_variant
from contract.normalize import normalize_french
from contract.quality import gate_rule
from contract.quant_spec import quant_spec

from . import fake_quant
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


def quantized_on(setting: str, device: str) -> str:
    """'fake_quant' or 'onnx': where the quantized ONNX variants are scored (eval.quantized_on)."""
    if setting == "auto":
        return "fake_quant" if device == "cuda" else "onnx"
    return setting


def pytorch_twin(name: str, cfg, workdir: Path) -> tuple[str, bool] | None:
    """(PyTorch model, fake-quantized?) that an ONNX variant was exported from, None when unknown."""
    qat, base, scheme = str(workdir / "train" / "model"), cfg.model.name_or_path, cfg.quant.scheme
    return {quantized_variant(scheme): (qat, True), ptq_variant(scheme): (base, True),
            "qat_onnx_fp32": (qat, False), "base_onnx_fp32": (base, False)}.get(name)


def same_tokens(twin, export, audios, max_new_tokens: int) -> dict:
    """Greedy token ids of the twin and of the ONNX export, clip by clip: {"clips", "identical", "differ"}."""
    differ = []
    for i, audio in enumerate(audios):
        a = twin.generate_ids(twin.features([audio]), max_new_tokens)[0].tolist()
        b = export.generate_ids(export.features([audio]), max_new_tokens)[0].tolist()
        if a != b:
            differ.append(i)
    return {"clips": len(audios), "identical": len(audios) - len(differ), "differ": differ}


def gate(cfg, counts: dict) -> dict:
    """contract/quality.py `gate_rule` (the rule the orchestrator applies again at home) over
    {variant: (per-utterance word errors, reference words)}: each difference the gate uses with its
    paired bootstrap interval."""
    e = cfg.eval
    return gate_rule(cfg.quant.scheme, counts, max_wer_degradation=e.max_wer_degradation,
                     references=e.gate_references, confidence=e.confidence, samples=e.bootstrap_samples)


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
    mode = quantized_on(cfg.eval.quantized_on, device)
    if mode == "fake_quant" and device == "cuda":  # fp32 as the CPU computes it: no TF32 matmuls or convolutions
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    threads = max(1, os.cpu_count() or 1)
    metrics: dict = {"wer": {}, "cer": {}, "wer_ci": {}, "cer_ci": {}, "n_utterances": len(test),
                     "variants": {}, "missing": missing, "quantized_on": mode}
    counts: dict = {}
    done, total = 0, len(variants) * len(audios)
    opts = dict(threads=threads, language=cfg.model.language, task=cfg.model.task, revision=cfg.model.revision)

    def transcribe(t, bs: int, name: str) -> list[str]:
        nonlocal done
        hyps: list[str] = []
        for start in range(0, len(audios), bs):
            chunk = audios[start:start + bs]
            hyps += t.transcribe(chunk, cfg.eval.max_new_tokens, bs)
            done += len(chunk)
            ctx.progress(done, total, variant=name)
        return hyps

    for name, path, kind in variants:
        info: dict = {"path": path, "kind": kind}
        twin = pytorch_twin(name, cfg, ctx.workdir) if kind == "onnx" and mode == "fake_quant" else None
        if twin:
            twin_path, fq = twin
            ctx.log(f"{name}: transcribing {len(audios)} clips with its PyTorch twin {twin_path}"
                    f"{' (fake-quantized)' if fq else ''} on {device}")
            t = load_variant(twin_path, "pytorch", device=device, **opts)
            if fq:
                fake_quant.prepare(t.model, quant_spec(cfg.quant))
            export = load_variant(path, "onnx", device="cpu", **opts)
            check = same_tokens(t, export, audios[:cfg.eval.onnx_check_clips], cfg.eval.max_new_tokens)
            info.update(scored_with=f"pytorch{' fake-quantized' if fq else ''} on {device}", onnx_check=check)
            if check["differ"]:
                info["scored_with"] = "onnx on cpu"
                info["why"] = (f"the export's tokens differ from its PyTorch twin's on clips {check['differ']} of the "
                               f"first {check['clips']}: scored from the export itself")
                ctx.log(f"{name}: {info['why']}")
                t, bs = export, BATCH_SIZE["onnx"]
            else:
                del export
                ctx.log(f"{name}: the export gives the same tokens on all {check['clips']} sample clips")
                bs = 1 if fq else BATCH_SIZE["pytorch"]  # fake-quantized: one activation range per clip, as served
            hyps = transcribe(t, bs, name)
        else:
            ctx.log(f"{name}: transcribing {len(audios)} clips with {kind} model {path}")
            t = load_variant(path, kind, device=device if kind == "pytorch" else "cpu", **opts)
            hyps = transcribe(t, BATCH_SIZE[kind], name)
        del t
        gc.collect()
        hyps_n = [normalize_french(h) for h in hyps]
        s = score(refs_n, hyps_n)
        ci = s.bootstrap(cfg.eval.bootstrap_samples)
        metrics["wer"][name], metrics["cer"][name] = round(s.wer, 3), round(s.cer, 3)
        metrics["wer_ci"][name], metrics["cer_ci"][name] = ci["wer"], ci["cer"]
        metrics["variants"][name] = info
        counts[name] = (s.word_errors, s.words)
        out = ctx.out / f"utterances_{name}.csv"
        write_utterances(out, ids, refs, hyps, refs_n, hyps_n, s)
        ctx.add_output(out)
        ctx.log(f"{name}: WER {s.wer:.2f} % {ci['wer']}, CER {s.cer:.2f} %")
    metrics["gate"] = gate(cfg, counts)
    verdict = "PASSED" if metrics["gate"]["passed"] else "FAILED: " + "; ".join(metrics["gate"]["reasons"])
    ctx.log(f"quality gate {verdict}")
    return metrics
