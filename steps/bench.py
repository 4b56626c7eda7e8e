"""Speed benchmark of every model variant, side by side, on real speech, on every device the machine has.

One section per device, each compared only with itself (steps/serving.py):
- cpu: the QAT model in PyTorch fp32, every ONNX directory written by convert (CPU EP), and
  faster-whisper int8 on the CTranslate2 whisper-base weights (when the model is that fixture).
- cuda (when CUDA is usable; otherwise skipped with the reason): the QAT model in PyTorch fp16 (the
  guide's baseline) and through torchao's weight-only kernel for the run's scheme, and the ONNX
  exports on ONNX Runtime's CUDA EP when onnxruntime-gpu is installed, with which nodes ran where.
Decoding is fixed for all: greedy, the configured language and task, max_new_tokens.
Clips are measured round-robin (clip 1 on every variant, then clip 2, ...), with the variant
order rotated per clip, so machine noise hits all variants alike; warm-up runs are not timed.

Per variant: median end-to-end latency per clip (feature extraction + generate), RTF,
throughput, encoder ms per clip, decoder ms per token over a forced number of tokens
(EOS suppressed, the same count for every variant), peak memory of a fresh process per variant
(RSS; on CUDA also the device memory it holds) and size on disk. Every row names its device and
execution provider.
"""
from __future__ import annotations

import importlib.util
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from contract.catalogue import ptq_variant, quantized_variant

from . import serving
from .peak_memory import peak_memory_mb
from .audio_store import to_float
from .common import StepContext, StepError
from .model_size import weights_mb

# Variants share one process: OpenMP threads must sleep, not spin, between runs (before torch loads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

SAMPLING_RATE = 16000


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str  # "pytorch" | "onnx" | "ctranslate2"
    path: str
    device: str = "cpu"  # "cpu" | "cuda"
    precision: str = "fp32"  # PyTorch only: one of serving.TORCH_PRECISIONS

    @property
    def provider(self) -> str:
        """The execution provider the variant runs on, as its result row records it."""
        if self.kind == "onnx":
            return "CUDAExecutionProvider" if self.device == "cuda" else "CPUExecutionProvider"
        if self.kind == "ctranslate2":
            return "ctranslate2-cpu"
        return f"torch-{self.device}-{self.precision}"


@dataclass(frozen=True)
class Decoding:
    language: str = "fr"
    task: str = "transcribe"
    max_new_tokens: int = 128
    forced_tokens: int = 32
    threads: int = 2


def size_mb(variant: Variant) -> float:
    """Model weights on disk: safetensors, .onnx + external data, or CTranslate2 model.bin."""
    return weights_mb(Path(variant.path), variant.kind)


class Runner:
    """One loaded variant; the four timed operations share the same processor and settings."""

    held_mb: float | None = None  # size of weights converted at load time (else size on disk)

    def __init__(self, variant: Variant, dec: Decoding):
        self.variant, self.dec = variant, dec

    def features(self, audio: np.ndarray) -> Any: ...
    def generate(self, feats: Any, max_new_tokens: int) -> int: ...  # returns new tokens
    def encode(self, feats: Any) -> Any: ...
    def decode_forced(self, enc: Any, n: int) -> int: ...

    def end_to_end(self, audio: np.ndarray) -> int:
        return self.generate(self.features(audio), self.dec.max_new_tokens)


class HFRunner(Runner):
    """transformers generate() on a PyTorch model or an ORTModelForSpeechSeq2Seq, through the same
    Transcriber (decoding loop, session options) that evaluate uses."""

    def __init__(self, variant: Variant, dec: Decoding):
        super().__init__(variant, dec)
        import torch

        from .inference import load_variant

        self.torch = torch
        torch.set_num_threads(dec.threads)
        self.device = variant.device
        if variant.kind == "pytorch":
            self.t = load_variant(variant.path, "pytorch", dec.threads, "cpu", dec.language, dec.task)
            self.t.model = serving.place_torch_model(self.t.model, self.device, variant.precision)
            self.t.device = self.device
            if variant.precision != "fp32":  # fp16 / quantized: the weights as held, not the fp32 file
                self.held_mb = serving.weights_mb(self.t.model)
        else:
            self.t = load_variant(variant.path, variant.kind, dec.threads, self.device, dec.language, dec.task)
        self.model = self.t.model

    def _sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def features(self, audio):
        return self.t.features([audio])

    def generate(self, feats, max_new_tokens):
        n = int(self.t.generate_ids(feats, max_new_tokens).shape[-1])
        self._sync()
        return n

    def encode(self, feats):
        with self.torch.inference_mode():
            if self.variant.kind == "pytorch":
                enc = self.model.get_encoder()(input_features=feats)
            else:
                enc = self.model.get_encoder()(input_features=feats, attention_mask=None)
        self._sync()
        return enc

    def decode_forced(self, enc, n):
        from transformers.modeling_outputs import BaseModelOutput

        enc = BaseModelOutput(last_hidden_state=enc.last_hidden_state)
        # min_new_tokens suppresses EOS until n tokens exist: every variant decodes exactly n steps
        out = int(self.t.generate_ids(None, n, encoder_outputs=enc, min_new_tokens=n).shape[-1])
        self._sync()
        return out


class CT2Runner(Runner):
    """faster-whisper's CTranslate2 model (int8), driven at the same level as generate()."""

    def __init__(self, variant: Variant, dec: Decoding):
        super().__init__(variant, dec)
        import ctranslate2
        from faster_whisper import WhisperModel
        from faster_whisper.tokenizer import Tokenizer

        self.ct2 = ctranslate2
        self.fw = WhisperModel(variant.path, device="cpu", compute_type="int8", cpu_threads=dec.threads, num_workers=1)
        tok = Tokenizer(self.fw.hf_tokenizer, True, task=dec.task, language=dec.language)
        self.prompt = list(tok.sot_sequence) + [tok.no_timestamps]
        self.eos = tok.eot

    def features(self, audio):
        from faster_whisper.audio import pad_or_trim

        mel = pad_or_trim(self.fw.feature_extractor(audio))
        return self.ct2.StorageView.from_array(np.ascontiguousarray(mel[None], dtype=np.float32))

    def _generate(self, feats, max_new_tokens: int, force: bool = False) -> int:
        # CTranslate2 4.8 halves max_length for Whisper: ask for twice the wanted new tokens
        res = self.fw.model.generate(feats, [self.prompt], beam_size=1, max_length=2 * max_new_tokens,
                                     suppress_tokens=[-1, self.eos] if force else [-1], return_scores=False)
        return len(res[0].sequences_ids[0])

    def generate(self, feats, max_new_tokens):
        return self._generate(feats, max_new_tokens)

    def encode(self, feats):
        return self.fw.model.encode(feats, to_cpu=False)

    def decode_forced(self, enc, n):
        return self._generate(enc, n, force=True)


def load_runner(variant: Variant, dec: Decoding) -> Runner:
    if variant.kind in ("pytorch", "onnx"):
        return HFRunner(variant, dec)
    if variant.kind == "ctranslate2":
        return CT2Runner(variant, dec)
    raise StepError(f"unknown variant kind {variant.kind!r} for {variant.name}")


def _timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def benchmark(variants: list[Variant], clips: list[tuple[str, np.ndarray]], dec: Decoding,
              warmup: int = 2, measure_memory: bool = True, log=print, progress=None) -> dict:
    """Time every variant on every clip, round-robin; returns {variant name: metrics}."""
    if not clips:
        raise StepError("no clips to benchmark: the prepare step's test split is empty")
    runners = {}
    for v in variants:
        t, runners[v.name] = _timed(load_runner, v, dec)
        log(f"loaded {v.name} ({v.kind}) in {t:.1f}s")
    for name, r in runners.items():  # warm-up: not timed
        for _ in range(warmup):
            r.end_to_end(clips[0][1])
            r.decode_forced(r.encode(r.features(clips[0][1])), dec.forced_tokens)
    names = list(runners)
    lat = {n: [] for n in names}
    toks = {n: [] for n in names}
    enc_ms = {n: [] for n in names}
    dec_ms = {n: [] for n in names}
    for i, (_, audio) in enumerate(clips):
        order = names[i % len(names):] + names[:i % len(names)]
        for n in order:
            r = runners[n]
            t, length = _timed(r.end_to_end, audio)
            lat[n].append(t)
            toks[n].append(length)
            feats = r.features(audio)
            t_enc, enc = _timed(r.encode, feats)
            t_dec, length = _timed(r.decode_forced, enc, dec.forced_tokens)
            enc_ms[n].append(t_enc * 1000)
            dec_ms[n].append(t_dec * 1000 / dec.forced_tokens)
        if progress:
            progress(i + 1, len(clips))
    audio_s = sum(len(a) for _, a in clips) / SAMPLING_RATE
    results = {}
    for v in variants:
        n, total = v.name, sum(lat[v.name])
        results[n] = {
            "kind": v.kind,
            "path": v.path,
            **serving.describe(v.device, v.provider),
            "precision": v.precision if v.kind == "pytorch" else None,
            "clips": len(clips),
            "latency_s": round(statistics.median(lat[n]), 4),
            "latency_mean_s": round(total / len(clips), 4),
            "rtf": round(total / audio_s, 4),
            "clips_per_s": round(len(clips) / total, 4),
            "audio_s_per_s": round(audio_s / total, 3),
            "encoder_ms": round(statistics.median(enc_ms[n]), 2),
            "decoder_ms_per_token": round(statistics.median(dec_ms[n]), 3),
            "mean_new_tokens": round(statistics.mean(toks[n]), 2),
            "size_mb": runners[n].held_mb or size_mb(v),
            "size_basis": "held in memory" if runners[n].held_mb else "on disk",
        }
    runners.clear()
    if measure_memory:
        _measure_memory(variants, dec, clips[0][1], results, log)
    return results


def _measure_memory(variants, dec, audio, results, log) -> None:
    for v in variants:
        results[v.name].update(peak_memory_mb(v, dec, audio))
        log(f"peak memory {v.name} ({v.device}): {results[v.name]}")


def load_clips(prepare_dir: Path, max_clips: int) -> list[tuple[str, np.ndarray]]:
    """Up to max_clips (id, float32 16 kHz audio) from the prepare step's test split."""
    from datasets import load_from_disk

    ds = load_from_disk(str(Path(prepare_dir) / "test")).select_columns(["id", "audio"])
    n = min(max_clips, len(ds))
    return [(row["id"], to_float(row["audio"])) for row in ds.select(range(n))]


def ct2_base_dir() -> Path:
    """The CTranslate2 whisper-base (int8 at load time by faster-whisper), joined once and cached."""
    from .models import cache_dir, write_ct2_dir

    d = cache_dir() / "whisper-base-ct2"
    if not (d / "model.bin").is_file() or not (d / "config.json").is_file():
        tmp = d.with_name(d.name + ".tmp")
        write_ct2_dir(tmp)
        tmp.rename(d)
    return d


def discover_variants(ctx: StepContext) -> list[Variant]:
    """The CPU section: PyTorch fp32 (the QAT model), every ONNX dir from convert, faster-whisper
    when applicable."""
    cfg = ctx.cfg
    # Variant names are the ones evaluate uses, so the report joins WER and latency per variant:
    # qat_fp32 is the QAT model in PyTorch, an ONNX fp32 export is "<model>_onnx_fp32".
    variants = [Variant("qat_fp32", "pytorch", str(ctx.dir_of("train") / "model"))]
    conv = ctx.dir_of("convert")
    for d in ("qat_fp32", quantized_variant(cfg.quant.scheme), "base_fp32", ptq_variant(cfg.quant.scheme)):
        if not (conv / d / "encoder_model.onnx").is_file():
            raise StepError(f"{conv / d} is missing: rerun the convert step")
        variants.append(Variant(d.replace("_fp32", "_onnx_fp32"), "onnx", str(conv / d)))
    if cfg.bench.faster_whisper and cfg.model.name_or_path == "fixture:whisper-base":
        variants.append(Variant("faster_whisper_int8", "ctranslate2", str(ct2_base_dir())))
    return variants


def cuda_variants(ctx: StepContext, log=print) -> list[Variant]:
    """The CUDA section: the QAT weights in PyTorch fp16 (the baseline) and through torchao's
    weight-only kernel of the run's scheme, and the ONNX exports on the CUDA EP when this
    onnxruntime has it (the ONNX fp32 export is the ONNX reference on the same device)."""
    scheme, model = ctx.cfg.quant.scheme, str(ctx.dir_of("train") / "model")
    variants = [Variant("qat_fp16", "pytorch", model, "cuda", "fp16")]
    if importlib.util.find_spec("torchao") is not None:
        variants.append(Variant(f"qat_{scheme}_torchao", "pytorch", model, "cuda", f"{scheme}_weight_only"))
    else:
        log(f"cuda: torchao is not installed: the PyTorch {scheme} weight-only variant is not measured")
    if serving.ort_provider("cuda") is None:
        log("cuda: this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu): ONNX not measured on CUDA")
        return variants
    conv = ctx.dir_of("convert")
    for d in ("qat_fp32", quantized_variant(scheme)):
        variants.append(Variant(d.replace("_fp32", "_onnx_fp32"), "onnx", str(conv / d), "cuda"))
    return variants


def onnx_placements(variants: list[Variant], results: dict) -> None:
    """For each ONNX variant on CUDA: which provider ran how many nodes, per graph (ORT puts shape
    ops and kernels the CUDA EP lacks, e.g. int8 MatMulInteger, on the CPU)."""
    from .convert import ENCODER, MERGED

    for v in variants:
        if v.kind == "onnx" and v.device == "cuda":
            results[v.name]["placement"] = {part: serving.node_placement(Path(v.path) / part, v.provider)
                                            for part in (ENCODER, MERGED)}


def decoding_of(cfg) -> Decoding:
    return Decoding(language=cfg.model.language, task=cfg.model.task, max_new_tokens=cfg.bench.max_new_tokens,
                    forced_tokens=cfg.bench.forced_tokens, threads=cfg.bench.threads)


FIGURES = ("latency_s", "encoder_ms", "decoder_ms_per_token", "rtf", "clips_per_s", "audio_s_per_s",
           "peak_rss_mb", "peak_vram_mb", "size_mb", "device", "provider")


def run(ctx: StepContext) -> dict:
    """{"devices": {device: {figure: {variant: value}}}, "skipped": {device: why}}: one section per device."""
    cfg = ctx.cfg
    clips = load_clips(ctx.dir_of("prepare"), cfg.bench.max_clips)
    dec = decoding_of(cfg)
    sections = {"cpu": discover_variants(ctx)}
    skipped = {}
    reason = serving.cuda_usable()
    if reason is None:
        sections["cuda"] = cuda_variants(ctx, ctx.log)
    else:
        skipped["cuda"] = reason
        ctx.log(f"cuda section skipped: {reason}")
    results = {}
    for device, variants in sections.items():
        ctx.log(f"{device}: {len(variants)} variants x {len(clips)} clips, {cfg.bench.threads} threads")
        results[device] = benchmark(variants, clips, dec, warmup=cfg.bench.warmup, log=ctx.log, progress=ctx.progress)
        onnx_placements(variants, results[device])
    out = {"devices": results, "skipped": skipped, "decoding": asdict(dec), "clips": len(clips)}
    (ctx.out / "results.json").write_text(json.dumps(out, indent=2))
    ctx.add_output(ctx.out / "results.json")
    return {"devices": {device: {k: {n: r.get(k) for n, r in rows.items()} for k in FIGURES}
                        for device, rows in results.items()},
            "skipped": skipped,
            "placement": {n: r["placement"] for rows in results.values() for n, r in rows.items() if "placement" in r}}
