"""Speed benchmark of every model variant, side by side, on real speech.

Variants: the QAT model in PyTorch fp32, every ONNX directory written by convert, and
faster-whisper int8 on the CTranslate2 whisper-base weights (when the model is that fixture).
Decoding is fixed for all: greedy, the configured language and task, max_new_tokens.
Clips are measured round-robin (clip 1 on every variant, then clip 2, ...), with the variant
order rotated per clip, so machine noise hits all variants alike; warm-up runs are not timed.

Per variant: median end-to-end latency per clip (feature extraction + generate), RTF,
throughput, encoder ms per clip, decoder ms per token over a forced number of tokens
(EOS suppressed, the same count for every variant), peak memory (a fresh process per variant,
or peak VRAM on GPU) and size on disk.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from contract.catalogue import ptq_variant, quantized_variant

from .common import StepContext, StepError

# Variants share one process: OpenMP threads must sleep, not spin, between runs (before torch loads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

SAMPLING_RATE = 16000


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str  # "pytorch" | "onnx" | "ctranslate2"
    path: str


@dataclass(frozen=True)
class Decoding:
    language: str = "fr"
    task: str = "transcribe"
    max_new_tokens: int = 128
    forced_tokens: int = 32
    threads: int = 2


def size_mb(variant: Variant) -> float:
    """Model weights on disk: safetensors, .onnx + external data, or CTranslate2 model.bin."""
    p = Path(variant.path)
    patterns = {"pytorch": ["*.safetensors", "*.bin"], "onnx": ["*.onnx", "*.onnx_data", "*.onnx.data"],
                "ctranslate2": ["model.bin"]}[variant.kind]
    files = {f for pat in patterns for f in p.glob(pat)}
    return round(sum(f.stat().st_size for f in files) / 1e6, 3)


class Runner:
    """One loaded variant; the four timed operations share the same processor and settings."""

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
        self.device = "cuda" if variant.kind == "pytorch" and torch.cuda.is_available() else "cpu"
        self.t = load_variant(variant.path, variant.kind, dec.threads, self.device, dec.language, dec.task)
        self.model = self.t.model

    def features(self, audio):
        return self.t.features([audio])

    def generate(self, feats, max_new_tokens):
        return int(self.t.generate_ids(feats, max_new_tokens).shape[-1])

    def encode(self, feats):
        with self.torch.inference_mode():
            if self.variant.kind == "pytorch":
                enc = self.model.get_encoder()(input_features=feats)
            else:
                enc = self.model.get_encoder()(input_features=feats, attention_mask=None)
        if self.device == "cuda":
            self.torch.cuda.synchronize()
        return enc

    def decode_forced(self, enc, n):
        from transformers.modeling_outputs import BaseModelOutput

        enc = BaseModelOutput(last_hidden_state=enc.last_hidden_state)
        # min_new_tokens suppresses EOS until n tokens exist: every variant decodes exactly n steps
        return int(self.t.generate_ids(None, n, encoder_outputs=enc, min_new_tokens=n).shape[-1])


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


def _peak_rss_main() -> None:
    """Child process body: load one variant, transcribe one clip, print peak RSS in MiB."""
    spec = json.loads(sys.stdin.read())
    runner = load_runner(Variant(**spec["variant"]), Decoding(**spec["decoding"]))
    runner.end_to_end(np.load(spec["audio"]))
    # VmHWM, not ru_maxrss: ru_maxrss survives execve and would report the parent's peak
    hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print("PEAK_RSS_MB", hwm_kb / 1024, flush=True)


def peak_rss_mb(variant: Variant, dec: Decoding, audio: np.ndarray, timeout: float = 600) -> float | None:
    """Peak resident memory of a fresh process that loads the variant and transcribes one clip."""
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "clip.npy", audio)
        spec = {"variant": asdict(variant), "decoding": asdict(dec), "audio": str(Path(tmp) / "clip.npy")}
        try:
            proc = subprocess.run([sys.executable, "-c", "from steps.bench import _peak_rss_main; _peak_rss_main()"],
                                  input=json.dumps(spec), capture_output=True, text=True, timeout=timeout,
                                  cwd=Path(__file__).resolve().parent.parent)
        except subprocess.TimeoutExpired:
            return None
    for line in proc.stdout.splitlines():
        if line.startswith("PEAK_RSS_MB "):
            return round(float(line.split()[1]), 1)
    return None


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
            "clips": len(clips),
            "latency_s": round(statistics.median(lat[n]), 4),
            "latency_mean_s": round(total / len(clips), 4),
            "rtf": round(total / audio_s, 4),
            "clips_per_s": round(len(clips) / total, 4),
            "audio_s_per_s": round(audio_s / total, 3),
            "encoder_ms": round(statistics.median(enc_ms[n]), 2),
            "decoder_ms_per_token": round(statistics.median(dec_ms[n]), 3),
            "mean_new_tokens": round(statistics.mean(toks[n]), 2),
            "size_mb": size_mb(v),
        }
    runners.clear()
    if measure_memory:
        _measure_memory(variants, dec, clips[0][1], results, log)
    return results


def _measure_memory(variants, dec, audio, results, log) -> None:
    import torch

    if torch.cuda.is_available():
        for v in variants:
            if v.kind != "pytorch":
                continue
            torch.cuda.reset_peak_memory_stats()
            load_runner(v, dec).end_to_end(audio)
            results[v.name]["peak_vram_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    for v in variants:
        results[v.name]["peak_rss_mb"] = peak_rss_mb(v, dec, audio)
        log(f"peak RSS {v.name}: {results[v.name]['peak_rss_mb']} MiB")


def load_clips(prepare_dir: Path, max_clips: int) -> list[tuple[str, np.ndarray]]:
    """Up to max_clips (id, float32 16 kHz audio) from the prepare step's test split."""
    from datasets import load_from_disk

    ds = load_from_disk(str(Path(prepare_dir) / "test")).select_columns(["id", "audio"])
    n = min(max_clips, len(ds))
    return [(row["id"], np.asarray(row["audio"], dtype=np.float32)) for row in ds.select(range(n))]


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
    """PyTorch fp32 (the QAT model), every ONNX dir from convert, faster-whisper when applicable."""
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


def decoding_of(cfg) -> Decoding:
    return Decoding(language=cfg.model.language, task=cfg.model.task, max_new_tokens=cfg.bench.max_new_tokens,
                    forced_tokens=cfg.bench.forced_tokens, threads=cfg.bench.threads)


def run(ctx: StepContext) -> dict:
    cfg = ctx.cfg
    clips = load_clips(ctx.dir_of("prepare"), cfg.bench.max_clips)
    variants = discover_variants(ctx)
    ctx.log(f"{len(variants)} variants x {len(clips)} clips, {cfg.bench.threads} threads")
    results = benchmark(variants, clips, decoding_of(cfg), warmup=cfg.bench.warmup, log=ctx.log,
                        progress=ctx.progress)
    out = {"variants": results, "decoding": asdict(decoding_of(cfg)), "clips": len(clips)}
    (ctx.out / "results.json").write_text(json.dumps(out, indent=2))
    ctx.add_output(ctx.out / "results.json")
    return {k: {n: r.get(k) for n, r in results.items()}
            for k in ("latency_s", "encoder_ms", "decoder_ms_per_token", "rtf", "clips_per_s",
                      "audio_s_per_s", "peak_rss_mb", "peak_vram_mb", "size_mb")}
