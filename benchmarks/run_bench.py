"""make bench: the offline pipeline for int8 AND int4, one side-by-side speed pass, the report.

    .venv/bin/python -m benchmarks.run_bench                 # configs/demo.yaml, everything
    .venv/bin/python -m benchmarks.run_bench --max-clips 8 --set train.max_steps=4   # a quicker pass
    .venv/bin/python -m benchmarks.run_bench --report-only   # re-render REPORT.md from results.json

1. prepare once (benchmarks/work/int8), shared with benchmarks/work/int4 (same data); train (QAT),
   convert, evaluate for int8, then for int4 started from the int8 QAT run's weights (the recipe
   that met its targets, benchmarks/INT4_RECIPE.md), via `python -m steps ...` (steps skip
   themselves when their outputs exist for the same config); evaluate scores every test clip of
   the manifest (180 in fixtures/french), not the demo's first 24.
2. one speed pass on the CPU over PyTorch fp32, ONNX fp32 / int8 / int4 and faster-whisper int8,
   measured round-robin per clip (steps/bench.py), on the test clips; right after it, on the same
   cores, benchmarks/int4_profile.py (int4_profile.json: the op split, the decoder step against its
   memory-bandwidth floor, the encoder's attention against the fp32 MatMul rate), so the report's
   reasons quote figures of the same hour. GPU serving figures come from
   benchmarks/gpu_serve.py (gpu_serve.json), GPU training figures from benchmarks/gpu_probe.py.
3. benchmarks/results.json (sizes, latency, encoder/decoder timings, WER/CER, targets) and
   benchmarks/REPORT.md (tables, targets met or missed with the figures that explain why, machine).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks.int4_profile import main as profile_main, part_ms
from contract.catalogue import SCHEMES, STEPS

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
TARGETS = {  # name: (description, limit)
    "int8_size_ratio": ("ONNX int8 size / PyTorch fp32 size", 0.30),
    # 0.20 while the vocabulary was 4-bit too; at 8 bits (quant.vocab_bits, benchmarks/INT4_RECIPE.md:
    # 0.227 measured) it costs whisper-base 14 MB, as its vocabulary is 37 % of its weights (large-v3: 9 %)
    "int4_size_ratio": ("ONNX int4 size / PyTorch fp32 size", 0.23),
    "int8_speedup_vs_pytorch": ("PyTorch fp32 latency / ONNX int8 latency", 4.0),
    "int8_speedup_vs_faster_whisper": ("faster-whisper int8 latency / ONNX int8 latency", 2.5),
    "int4_latency_vs_int8": ("ONNX int4 latency / ONNX int8 latency", 1.0),
    "int4_decoder_vs_int8": ("ONNX int4 decoder ms/token / ONNX int8 decoder ms/token", 1.0),
    "qat_int8_wer_loss": ("WER(QAT int8) - WER(QAT fp32), points", 0.5),
    "qat_int8_minus_ptq_int8_wer": ("WER(QAT int8) - WER(PTQ int8), points", 0.0),
    "qat_int4_wer_loss": ("WER(QAT int4) - WER(its QAT fp32), points", 1.0),
    "qat_int4_minus_ptq_int4_wer": ("WER(QAT int4) - WER(PTQ int4 of the same start), points", 0.0),
}
LOWER_IS_BETTER = {"int8_size_ratio", "int4_size_ratio", "int4_latency_vs_int8", "int4_decoder_vs_int8",
                   "qat_int8_wer_loss", "qat_int8_minus_ptq_int8_wer", "qat_int4_wer_loss", "qat_int4_minus_ptq_int4_wer"}
# WER differences with a paired 95 % interval (the same clips resampled for both): (name, run, variant, minus)
PAIRED = (("qat_int8_minus_qat_fp32", "int8", "qat_int8", "qat_fp32"),
          ("qat_int8_minus_base_ptq_int8", "int8", "qat_int8", "base_ptq_int8"),
          ("qat_int4_minus_its_qat_fp32", "int4", "qat_int4", "qat_fp32"),
          ("qat_int4_minus_base_ptq_int4", "int4", "qat_int4", "base_ptq_int4"))


# ---------------------------------------------------------------- pipeline

def write_config(base: str, scheme: str, overrides: dict, path: Path):
    from contract.config import load_config

    cfg = load_config(base, {**overrides, "quant.scheme": scheme})
    cfg = cfg.model_copy(update={"name": f"{cfg.name}-{scheme}"[:41]})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(cfg.to_yaml())
    return cfg


def every_eval_clip(base: str, overrides: dict) -> dict:
    """make bench scores every test clip its manifest holds (data.max_eval_samples; the demo takes the first 24).

    WER differences of a point, the int4 targets, are far inside what 24 or 60 clips resolve (REPORT.md
    prints each paired interval); an explicit --set data.max_eval_samples=N still wins.
    """
    from contract.config import load_config
    from steps.prepare import manifest_split_counts

    cfg = load_config(base, overrides)
    if cfg.data.source != "manifest" or "data.max_eval_samples" in overrides:
        return overrides
    tests = manifest_split_counts(cfg)[cfg.data.test_split]
    return {**overrides, "data.max_eval_samples": max(tests, cfg.data.max_eval_samples)}


def run_step_subprocess(step: str, config: Path, workdir: Path) -> None:
    cmd = [sys.executable, "-m", "steps", step, "--config", str(config), "--workdir", str(workdir)]
    print(f"$ {' '.join(cmd)}", flush=True)
    t = time.time()
    rc = subprocess.run(cmd, cwd=REPO).returncode
    if rc != 0:
        err = workdir / step / "error.json"
        detail = err.read_text() if err.is_file() else "(no error.json)"
        raise SystemExit(f"step {step} failed with exit code {rc} in {workdir}: {detail}")
    print(f"  {step} done in {time.time() - t:.0f}s", flush=True)


def share_prepare(src: Path, dst: Path) -> None:
    """The int4 run reads the int8 run's prepared data (same model + data sections, same hash)."""
    link = dst / "prepare"
    dst.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or not link.exists():
        if link.is_symlink():
            link.unlink()
        link.symlink_to(os.path.relpath(src / "prepare", dst))


def int4_overrides(work: Path, overrides: dict) -> dict:
    """The int4 run starts from the int8 QAT run's weights (a local folder: the local backend)."""
    return {**overrides, "model.name_or_path": str((work / "int8" / "train" / "model").resolve()),
            "machine.backend": "local"}


def pipeline(work: Path, base: str, overrides: dict) -> dict:
    configs = {scheme: work / f"{scheme}.yaml" for scheme in SCHEMES}
    steps = [s for s in STEPS if s not in ("prepare", "bench")]  # prepare runs once, shared; this script is the bench
    write_config(base, "int8", overrides, configs["int8"])
    run_step_subprocess("prepare", configs["int8"], work / "int8")
    for step in steps:
        run_step_subprocess(step, configs["int8"], work / "int8")
    write_config(base, "int4", int4_overrides(work, overrides), configs["int4"])
    share_prepare(work / "int8", work / "int4")
    for step in steps:
        run_step_subprocess(step, configs["int4"], work / "int4")
    return configs


def speed_only_models(work: Path, config: Path) -> dict[str, str]:
    """--speed-only: the untrained base model as PyTorch fp32 and its ONNX fp32 / int8 / int4 exports.

    Speed and size do not depend on the trained values of the weights, so this measures the same
    graphs as the full run in a fraction of the time (no training, no evaluation: no WER).
    """
    from steps import convert
    from contract.config import load_config
    from contract.quant_spec import QuantSpec
    from steps.models import resolve_model

    cfg = load_config(str(config))
    base = Path(resolve_model(cfg.model.name_or_path))
    out = work / "speed"
    paths = {"pytorch_fp32": str(base), "onnx_fp32": str(out / "base_fp32"),
             "onnx_int8": str(out / "base_ptq_int8"), "onnx_int4": str(out / "base_ptq_int4")}
    if not all((Path(p) / "encoder_model.onnx").is_file() for k, p in paths.items() if k != "pytorch_fp32"):
        convert.export(base, out / "base_fp32")
        for scheme in SCHEMES:
            spec = QuantSpec.of(scheme, cfg.quant.group_size, cfg.quant.vocab_bits,
                                cfg.quant.encoder_layout if scheme == "int4" else "int4_int8_kernel")
            convert.quantize_dir(out / "base_fp32", out / f"base_ptq_{scheme}", spec)
            convert.check_quantized(out / f"base_ptq_{scheme}", spec)
        convert.finish_fp32_dir(out / "base_fp32")
    return paths


# ---------------------------------------------------------------- the speed pass

def trained_models(work: Path) -> dict[str, str]:
    w8, w4 = work / "int8", work / "int4"
    return {"pytorch_fp32": str(w8 / "train" / "model"), "onnx_fp32": str(w8 / "convert" / "qat_fp32"),
            "onnx_int8": str(w8 / "convert" / "qat_int8"), "onnx_int4": str(w4 / "convert" / "qat_int4")}


def speed_pass(work: Path, config: Path, max_clips: int | None, models: dict[str, str]) -> dict:
    from steps import bench
    from contract.config import load_config

    cfg = load_config(str(config))
    w8 = work / "int8"
    variants = [bench.Variant(name, "pytorch" if name.startswith("pytorch") else "onnx", path)
                for name, path in models.items()]
    if cfg.bench.faster_whisper and cfg.model.name_or_path == "fixture:whisper-base":
        variants.append(bench.Variant("faster_whisper_int8", "ctranslate2", str(bench.ct2_base_dir())))
    clips = bench.load_clips(w8 / "prepare", max_clips or cfg.bench.max_clips)
    dec = bench.decoding_of(cfg)
    print(f"speed pass: {len(variants)} variants x {len(clips)} clips, {dec.threads} threads", flush=True)
    results = bench.benchmark(variants, clips, dec, warmup=cfg.bench.warmup,
                              progress=lambda d, t: print(f"  clip {d}/{t}", flush=True))
    return {"variants": results, "decoding": asdict(dec), "clips": len(clips),
            "audio_s": round(sum(len(a) for _, a in clips) / bench.SAMPLING_RATE, 2)}


# ---------------------------------------------------------------- results and targets

def _metrics(workdir: Path, step: str) -> dict:
    p = workdir / step / "result.json"
    return json.loads(p.read_text())["metrics"] if p.is_file() else {}


def collect(work: Path, speed: dict) -> dict:
    from steps.convert import tensor_mb_by_dtype

    v = speed["variants"]
    e8, e4 = _metrics(work / "int8", "evaluate"), _metrics(work / "int4", "evaluate")
    variants = ("pytorch_fp32", "onnx_fp32", "onnx_int8", "onnx_int4", "faster_whisper_int8")
    out = {
        "sizes_mb": {k: v[k]["size_mb"] for k in variants if k in v},
        "latency_s": {k: v[k]["latency_s"] for k in variants if k in v},
        "encoder_ms": {k: v[k]["encoder_ms"] for k in variants if k in v},
        "decoder_ms_per_token": {k: v[k]["decoder_ms_per_token"] for k in variants if k in v},
        "rtf": {k: v[k]["rtf"] for k in variants if k in v},
        "peak_rss_mb": {k: v[k].get("peak_rss_mb") for k in variants if k in v},
        "mean_new_tokens": {k: v[k]["mean_new_tokens"] for k in variants if k in v},
        "wer": {}, "cer": {}, "wer_ci": {},
    }
    for name, src, key in (("base_fp32", e8, "base_fp32"), ("base_ptq_int8", e8, "base_ptq_int8"),
                           ("qat_fp32", e8, "qat_fp32"), ("qat_int8", e8, "qat_int8"),
                           ("qat_int4", e4, "qat_int4"), ("qat_fp32_int4_run", e4, "qat_fp32"),
                           ("base_ptq_int4", e4, "base_ptq_int4")):
        if key in src.get("wer", {}):
            out["wer"][name], out["cer"][name] = src["wer"][key], src["cer"][key]
            out["wer_ci"][name] = src.get("wer_ci", {}).get(key)
    out["wer_paired_ci"] = paired_gaps(work)
    out["gates"] = {"int8": e8.get("gate"), "int4": e4.get("gate")}
    out["eval_clips"] = e8.get("n_utterances")
    out["tensor_mb_by_dtype"] = {k: tensor_mb_by_dtype(Path(v[k]["path"])) for k in ("onnx_fp32", "onnx_int8", "onnx_int4") if k in v}
    out["targets"] = targets(out)
    out["speed_pass"] = speed
    out["machine"] = machine()
    return out


def _utterances(path: Path) -> dict | None:
    import csv

    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return {"word_errors": [int(r["errors"]) for r in rows], "words": [int(r["words"]) for r in rows]}


def paired_gaps(work: Path) -> dict:
    """WER(a) - WER(b) in points with its paired 95 % bootstrap interval, from evaluate's per-clip counts."""
    from benchmarks.int4_recipe import gap_ci

    out = {}
    for name, run, a, b in PAIRED:
        ua, ub = (_utterances(work / run / "evaluate" / f"utterances_{v}.csv") for v in (a, b))
        if ua and ub:
            rate = lambda u: 100.0 * sum(u["word_errors"]) / max(sum(u["words"]), 1)  # noqa: E731
            out[name] = {"gap": round(rate(ua) - rate(ub), 2), "ci95": gap_ci(ua, ub)}
    return out


def _ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def targets(r: dict) -> dict:
    s, lat, wer, dec = r["sizes_mb"], r["latency_s"], r["wer"], r["decoder_ms_per_token"]
    gap = lambda a, b: round(wer[a] - wer[b], 3) if a in wer and b in wer else None  # noqa: E731
    values = {
        "int8_size_ratio": _ratio(s.get("onnx_int8"), s.get("pytorch_fp32")),
        "int4_size_ratio": _ratio(s.get("onnx_int4"), s.get("pytorch_fp32")),
        "int8_speedup_vs_pytorch": _ratio(lat.get("pytorch_fp32"), lat.get("onnx_int8")),
        "int8_speedup_vs_faster_whisper": _ratio(lat.get("faster_whisper_int8"), lat.get("onnx_int8")),
        "int4_latency_vs_int8": _ratio(lat.get("onnx_int4"), lat.get("onnx_int8")),
        "int4_decoder_vs_int8": _ratio(dec.get("onnx_int4"), dec.get("onnx_int8")),
        "qat_int8_wer_loss": gap("qat_int8", "qat_fp32"),
        "qat_int8_minus_ptq_int8_wer": gap("qat_int8", "base_ptq_int8"),
        "qat_int4_wer_loss": gap("qat_int4", "qat_fp32_int4_run"),
        "qat_int4_minus_ptq_int4_wer": gap("qat_int4", "base_ptq_int4"),
    }
    out = {}
    for name, (desc, limit) in TARGETS.items():
        val = values[name]
        met = None if val is None else (val <= limit if name in LOWER_IS_BETTER else val >= limit)
        out[name] = {"description": desc, "value": val, "limit": limit,
                     "rule": "<=" if name in LOWER_IS_BETTER else ">=", "met": met}
    return out


def machine() -> dict:
    import onnxruntime
    import torch

    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
        model = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                      if l.startswith("model name")), platform.processor())
    except OSError:
        model = platform.processor()
    simd = sorted(f for f in flags if f in {"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16"})
    return {"cpu": model, "cores": os.cpu_count(), "simd": simd,
            "int8_dot_product": bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"}),
            "load_avg_1m": round(os.getloadavg()[0], 2), "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


# ---------------------------------------------------------------- REPORT.md

def _fmt(x, nd=1):
    if x is None:
        return "n/a"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def _ci(ci) -> str:
    return f"[{ci[0]:.1f}, {ci[1]:.1f}]" if isinstance(ci, (list, tuple)) and len(ci) == 2 else "n/a"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return "\n".join(lines)


def wer_pair(r: dict, target: str) -> dict | None:
    """The paired WER difference (gap, 95 % interval) a WER target is judged on; None for the others."""
    if not target.startswith("qat_"):
        return None
    run = "int4" if "int4" in target else "int8"
    return next((v for k, v in r.get("wer_paired_ci", {}).items()
                 if k.startswith(f"qat_{run}_minus_") and ("ptq" in k) == ("ptq" in target)), None)


def verdict(r: dict, name: str) -> str:
    """met / missed; for a WER target also whether its paired interval resolves that (the limit outside it)."""
    t = r["targets"][name]
    word = {True: "met", False: "**missed**", None: "not measured"}[t["met"]]
    pair = wer_pair(r, name)
    if t["met"] is None or not (pair and pair.get("ci95")):
        return word
    lo, hi = pair["ci95"]
    resolved = hi <= t["limit"] if t["met"] else lo > t["limit"]
    return f"{word} ({'resolved' if resolved else 'not resolved'}: 95 % interval {_ci(pair['ci95'])})"


def explain(r: dict) -> list[str]:
    """One line of figures per missed (or unmeasured) target."""
    t, s, m = r["targets"], r["sizes_mb"], r["machine"]
    enc, dec, toks = r["encoder_ms"], r["decoder_ms_per_token"], r["mean_new_tokens"]
    profile = load_profile()
    lines = []
    for name, tt in t.items():
        if tt["met"] is True:
            continue
        if tt["met"] is None:
            lines.append(f"- `{name}`: not measured (a variant or the evaluation is missing).")
            continue
        if name in ("int8_size_ratio", "int4_size_ratio"):
            key = "onnx_int8" if name.startswith("int8") else "onnx_int4"
            by = r["tensor_mb_by_dtype"].get(key, {})
            fl = by.get("float32", 0)
            big = ", ".join(f"{n} {mb:.1f} MB" for n, mb in by.get("largest_float", [])[:3])
            lines.append(f"- `{name}` = {tt['value']} > {tt['limit']}: of the {s.get(key)} MB, {fl:.1f} MB are still "
                         f"float32 tensors (largest: {big}); the quantized weights themselves are "
                         f"{sum(v for k, v in by.items() if k not in ('float32', 'largest_float')):.1f} MB.")
        elif name.startswith("int8_speedup"):
            ref = "pytorch_fp32" if name.endswith("pytorch") else "faster_whisper_int8"
            lat = r["latency_s"]

            def split(v):  # "latency ms = encoder + tokens x ms/token + rest"
                total, e, d, n = 1000 * lat[v], enc[v], dec[v], toks[v]
                return f"{total:.0f} ms = encoder {e:.0f} + {n:.1f} tokens x {d:.2f} ms + {total - e - n * d:.0f} other"

            cpu = ("this CPU has int8 dot-product instructions (VNNI), so the fp32 remainder bounds the gain"
                   if m["int8_dot_product"] else "this CPU has no int8 dot-product instructions (VNNI/AMX): int8 "
                   "GEMMs run on AVX2 16-bit multiply-adds, at best about 2x fp32 FMA throughput")
            lines.append(
                f"- `{name}` = {tt['value']} < {tt['limit']}: {tt['limit']}x needs onnx_int8 at "
                f"{1000 * lat[ref] / tt['limit']:.0f} ms per clip. onnx_int8: {split('onnx_int8')}; {ref}: {split(ref)}. "
                f"The encoder, {100 * enc['onnx_int8'] / (1000 * lat['onnx_int8']):.0f} % of the int8 time, gains "
                f"x{_fmt(_ratio(enc.get(ref), enc.get('onnx_int8')), 2)} over {ref} "
                f"(x{_fmt(_ratio(enc.get('onnx_fp32'), enc.get('onnx_int8')), 2)} over ONNX fp32; decoder tokens "
                f"x{_fmt(_ratio(dec.get('onnx_fp32'), dec.get('onnx_int8')), 2)}): int8 covers the weight MatMuls, while "
                f"the encoder's attention over 1500 frames (two activations multiplied, fused MultiHeadAttention), "
                f"its two convolutions, GELU and layer norms stay fp32; {cpu}."
                f"{_ceiling_words(profile, 1000 * lat['onnx_int8'], toks['onnx_int8'], 1000 * lat[ref] / tt['limit'])} Load average "
                f"{m['load_avg_1m']} on {m['cores']} cores at report time.")
        elif name.startswith("int4_"):
            lines.append(
                f"- `{name}` = {tt['value']} > {tt['limit']}: onnx_int4 encoder {_fmt(enc.get('onnx_int4'))} ms and "
                f"{_fmt(dec.get('onnx_int4'), 2)} ms/token, onnx_int8 {_fmt(enc.get('onnx_int8'))} ms and "
                f"{_fmt(dec.get('onnx_int8'), 2)} ms/token, onnx_fp32 {_fmt(enc.get('onnx_fp32'))} ms and "
                f"{_fmt(dec.get('onnx_fp32'), 2)} ms/token. The op-by-op split is in benchmarks/int4_profile.json "
                "(INT4_RECIPE.md)." + _profile_words(r, profile))
        else:
            pair = wer_pair(r, name)
            lines.append(f"- `{name}` = {tt['value']} points (limit {tt['rule']} {tt['limit']}): paired 95 % interval "
                         f"{_ci(pair and pair['ci95'])} over the same {r.get('eval_clips')} clips: a limit inside the "
                         "interval is not resolved by this test set.")
    return lines


LAYOUT_WORDS = {"int4_acc0": "MatMulNBits, float activations", "int4_acc4": "MatMulNBits, int8 activation blocks",
                "int4_int8_kernel": "4-bit codes folded into int8 weights at load"}


PROFILE = BENCH / "int4_profile.json"  # written by `python -m benchmarks.int4_profile`


def load_profile() -> dict | None:
    """benchmarks/int4_profile.json, or None when it was never written."""
    return json.loads(PROFILE.read_text()) if PROFILE.is_file() else None


def _ceiling_words(profile: dict | None, latency_ms: float, tokens: float, needed_ms: float) -> str:
    """The int8 model's two largest parts against what this CPU allows, from the profile
    (benchmarks/int4_profile.py): the encoder's attention against the fp32 MatMul rate, a decoder step
    (without the profiler) against its memory-bandwidth floor; then the clip at both ceilings against
    the time the target needs. "" when not profiled."""
    v = (profile or {}).get("variants", {}).get("onnx_int8") or {}
    a, step = v.get("encoder_attention"), v.get("decoder_step")
    if not a or a.get("vs_fp32_matmul_rate") is None or not step:
        return ""
    step_ms, floor = part_ms(step), v["decoder_floor_ms"]
    saved = a["ms"] - a["floor_ms_at_fp32_matmul_rate"] + tokens * max(step_ms - floor, 0.0)
    return (f" In the profile (benchmarks/int4_profile.json) the int8 encoder's attention, {a['gflop']} GFLOP a clip, "
            f"took {a['ms']:.1f} ms: {a['gflops']:.0f} GFLOP/s, {100 * a['vs_fp32_matmul_rate']:.0f} % of the "
            f"{a['fp32_matmul_gflops']:.0f} GFLOP/s one fp32 MatMul of the encoder's shapes reaches on the same cores "
            f"(at that rate it would still take {a['floor_ms_at_fp32_matmul_rate']:.0f} ms); a decoder step, "
            f"{'without the profiler' if 'plain_ms' in step else 'as profiled'}, took {step_ms:.2f} ms against the "
            f"{floor:.2f} ms it takes to read the decoder's weights and KV cache once ({step_ms / floor:.2f}x its memory-bandwidth floor). With both at those ceilings the clip "
            f"would take {latency_ms - saved:.0f} ms ({saved:.0f} ms less over {tokens:.1f} tokens), against the "
            f"{needed_ms:.0f} ms needed.")


def _profile_words(r: dict, doc: dict | None) -> str:
    """Where int4's time goes against int8's, from benchmarks/int4_profile.json: one encoder MatMul in each
    layout (kernels_ms), then the decoder's first call of a clip (cross-attention keys and values of 1500
    frames) and one step; "" when not profiled."""
    if doc is None:
        return ""
    prof, words = doc["variants"], ""
    enc = doc.get("kernels_ms", {}).get("encoder_fc1_1500x512x2048")
    if enc and {"int8", "shipped"} <= set(enc):
        timed = "; ".join(f"{LAYOUT_WORDS.get(label, label)}{' (what int4 ships)' if label == enc['shipped'] else ''} "
                          f"{ms:.2f} ms" for label, ms in enc.items() if label != "shipped")
        words += (f" One encoder MatMul (1500 frames x 512 -> 2048): {timed}. At 1500 rows MatMulNBits saves memory "
                  "and bandwidth, not arithmetic, where int8 multiplies integers.")
    parts = {v: prof.get(v, {}) for v in ("onnx_int4", "onnx_int8")}
    first = {v: part_ms(p.get("decoder_first_step")) for v, p in parts.items()}
    step = {v: part_ms(p.get("decoder_step")) for v, p in parts.items()}
    forced = (r.get("speed_pass", {}).get("decoding") or {}).get("forced_tokens")
    if None not in (*first.values(), *step.values()) and forced:
        words += (f" In the profile one decoder step costs int4 {step['onnx_int4']:.2f} ms against int8's "
                  f"{step['onnx_int8']:.2f}, and the first call of a clip (the cross-attention keys and values of all 1500 "
                  f"frames, once per clip) {first['onnx_int4']:.1f} ms against {first['onnx_int8']:.1f}: spread over the "
                  f"{forced} forced tokens, {(first['onnx_int4'] - first['onnx_int8']) / forced:+.2f} ms on each int4 token.")
    return words


def floor_section() -> list[str]:
    """The decoder step against its memory-bandwidth floor, from benchmarks/int4_profile.json."""
    prof = load_profile()
    if prof is None:
        return ["Decoder step vs memory-bandwidth floor: not measured (run `python -m benchmarks.int4_profile`)."]
    rows = [[name, part_ms(v["encoder"]), part_ms(v.get("decoder_first_step")), part_ms(v["decoder_step"]),
             v["decoder_step"]["run_ms"], v["decoder_weights_mb"], v["decoder_kv_cache_mb"], v["decoder_floor_ms"],
             v["decoder_step_vs_floor"]]
            for name, v in prof["variants"].items()]
    return ["### One decoder step against its memory-bandwidth floor (benchmarks/int4_profile.json)", "",
            f"`{prof['command']}`: {prof['threads']} threads, {prof['decoder_past_tokens']} tokens in the KV cache; median "
            "times of sessions without ONNX Runtime's profiler, which times each node and so adds about as much to a "
            "decoder step as the step's own work (the profiled step beside it; the profile gives INT4_RECIPE.md its op "
            f"split). The floor reads the decoder's weights and KV cache once at the {prof['read_bandwidth_gbs']} GB/s "
            f"numpy measured (load average {prof['load_avg_1m']}). The first decoder call of a clip (the prompt, no "
            "past) computes the cross-attention keys and values of all 1500 frames: once per clip, it is in the "
            "speed pass's ms/token, not in a step's.", "",
            _table(["variant", "encoder ms", "first decoder call ms", "decoder step ms", "profiled step ms",
                    "decoder weights MB", "KV cache MB", "floor ms", "step / floor"], rows)]


def render_bench_report(r: dict, gpu: dict | None, serve: dict | None = None) -> str:
    m, sp = r["machine"], r.get("speed_pass", {})
    dec = sp.get("decoding", {})
    variants = ["pytorch_fp32", "onnx_fp32", "onnx_int8", "onnx_int4", "faster_whisper_int8"]
    speed_rows = [[v, r["sizes_mb"].get(v), _fmt(r["latency_s"].get(v), 3), _fmt(r["rtf"].get(v), 3), r["encoder_ms"].get(v),
                   _fmt(r["decoder_ms_per_token"].get(v), 2), r["mean_new_tokens"].get(v), r["peak_rss_mb"].get(v)]
                  for v in variants if v in r["latency_s"]]
    wer_rows = [[k, r["wer"][k], r["cer"].get(k), _ci(r["wer_ci"].get(k))] for k in r["wer"]]
    tgt_rows = [[k, t["description"], f"{t['rule']} {t['limit']}", _fmt(t["value"], 3), verdict(r, k)]
                for k, t in r["targets"].items()]
    parts = [
        "# Benchmark report (generated by benchmarks/run_bench.py)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, SIMD {', '.join(m['simd'])}, int8 dot-product "
        f"(VNNI/AMX): {'yes' if m['int8_dot_product'] else 'no'}; torch {m['torch']}, onnxruntime "
        f"{m['onnxruntime']}, Python {m['python']}; 1-min load average {m['load_avg_1m']} at report time "
        "(the CPU is shared: absolute times are noisy, the round-robin order keeps the comparison fair).",
        "",
        f"Speed pass: {sp.get('clips')} test clips ({sp.get('audio_s')} s of espeak-ng French speech), "
        f"greedy, language {dec.get('language')}, task {dec.get('task')}, max_new_tokens "
        f"{dec.get('max_new_tokens')}, {dec.get('threads')} threads, variants interleaved per clip, warm-up excluded. "
        f"Decoder ms/token: {dec.get('forced_tokens')} tokens forced (EOS suppressed) on every variant.",
        "",
        f"Mode: {r.get('mode', 'full (QAT models)')}.",
        "",
        "## Speed and size",
        "",
        _table(["variant", "size MB", "latency s/clip (median)", "RTF", "encoder ms", "decoder ms/token",
                "mean new tokens", "peak RSS MiB"], speed_rows),
        "",
        ("pytorch_fp32 and onnx_* are the untrained base model and its PTQ exports (same graphs and sizes "
         "as the QAT exports); " if str(r.get("mode", "")).startswith("speed-only") else
         "pytorch_fp32 and onnx_* are the QAT-trained model (onnx_int4 from the int4 QAT run); ")
        + "faster_whisper_int8 is the untrained CTranslate2 whisper-base (float16 on disk, int8 at load).",
        "",
        "## Accuracy (test split, normalized text, percent)",
        "",
        _table(["variant", "WER", "CER", "WER 95% CI"], wer_rows) if wer_rows else "No evaluation results found.",
        "",
        f"{r.get('eval_clips') or 'n/a'} test clips, greedy; ONNX variants transcribe one clip per call, as served "
        "(int8 activation ranges are per call), PyTorch variants in batches of 8. qat_fp32 is the int8 QAT run's "
        "model without quantization; qat_fp32_int4_run the int4 run's, which started from the int8 QAT weights "
        "(base_ptq_int4 quantizes that same start).",
        "",
        _table(["WER difference", "points", "paired 95% CI"],
               [[k, v["gap"], _ci(v["ci95"])] for k, v in r["wer_paired_ci"].items()])
        if r.get("wer_paired_ci") else "No paired WER differences (no evaluation results).",
        "",
        *floor_section(),
        "",
        "## Targets",
        "",
        _table(["target", "measure", "rule", "value", "verdict"], tgt_rows),
        "",
        "### Why targets were missed (figures)",
        "",
        *(explain(r) or ["All targets met."]),
        "",
        "## GPU (training speed probe, benchmarks/gpu_probe.py)",
        "",
    ]
    if gpu and gpu.get("is_gpu"):
        rows = [[k, v.get("samples_per_s"), v.get("s_per_step"), v.get("peak_vram_gib"), v.get("error", "")]
                for k, v in gpu["results"].items()]
        parts += [f"{gpu['device']}, {gpu['shapes']} shapes, batch {gpu['batch']}, {gpu['precision']}, "
                  f"checkpointing {gpu['gradient_checkpointing']}:", "",
                  _table(["mode", "samples/s", "s/step", "peak VRAM GiB", "note"], rows)]
    else:
        parts += ["GPU not measured this session (no CUDA device). Run `python -m benchmarks.gpu_probe` on a "
                  "CUDA machine to write benchmarks/gpu.json; this section then shows it."]
    parts += ["", "## GPU serving (benchmarks/gpu_serve.py)", "", *serving_section(serve)]
    return "\n".join(parts) + "\n"


def serving_section(serve: dict | None) -> list[str]:
    """gpu_serve.json as a table: every ratio is against fp16 on the same GPU."""
    if not serve:
        return ["GPU serving not measured this session (no CUDA device). Run `python -m benchmarks.gpu_serve --onnx` "
                "on a CUDA machine to write benchmarks/gpu_serve.json; this section then shows it."]
    ratios = serve.get("vs_fp16_same_device", {})
    rows = [[name, r.get("provider", ""), r.get("size_mb"), r.get("peak_vram_mb"), _fmt(r.get("latency_s"), 3),
             _fmt(r.get("decoder_ms_per_token"), 2), _fmt(ratios.get(name, {}).get("speed_vs_fp16"), 2),
             _fmt(ratios.get(name, {}).get("vram_vs_fp16"), 2), r.get("error", "")] for name, r in serve["results"].items()]
    return [f"{serve['device']}, {serve['shapes']} shapes (random weights), torch {serve['torch']}; "
            f"`{serve['command']}`:", "",
            _table(["variant", "provider", "size MB", "peak VRAM MiB", "latency s/clip", "decoder ms/token",
                    "speed vs fp16", "VRAM vs fp16", "note"], rows), "",
            f"Targets (issue 13): {json.dumps(serve.get('targets', {}))}; ONNX int8 node placement on the CUDA EP: "
            f"{json.dumps(serve.get('onnx_int8_placement') or 'not measured')}."]


def write_outputs(results: dict) -> None:
    (BENCH / "results.json").write_text(json.dumps(results, indent=2))
    gpu_file, serve_file = BENCH / "gpu.json", BENCH / "gpu_serve.json"
    gpu = json.loads(gpu_file.read_text()) if gpu_file.is_file() else None
    serve = json.loads(serve_file.read_text()) if serve_file.is_file() else None
    (BENCH / "REPORT.md").write_text(render_bench_report(results, gpu, serve))
    print(f"wrote {BENCH / 'results.json'} and {BENCH / 'REPORT.md'}")


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value (e.g. train.max_steps=4), got {p!r}")
        import yaml

        out[key] = yaml.safe_load(value)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="demo", help="base config (quant.scheme is set to int8 and int4)")
    p.add_argument("--work", type=Path, default=BENCH / "work")
    p.add_argument("--max-clips", type=int, default=None, help="clips in the speed pass (default: bench.max_clips)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted config override")
    p.add_argument("--skip-pipeline", action="store_true", help="reuse the step outputs already in --work")
    p.add_argument("--speed-only", action="store_true",
                   help="no training/evaluation: time the untrained base model's exports (no WER)")
    p.add_argument("--report-only", action="store_true", help="re-render REPORT.md from benchmarks/results.json")
    a = p.parse_args(argv)
    if a.report_only:
        write_outputs(json.loads((BENCH / "results.json").read_text()))
        return 0
    overrides = _overrides(a.set)
    if a.speed_only:
        configs = {s: a.work / f"{s}.yaml" for s in SCHEMES}
        write_config(a.config, "int8", overrides, configs["int8"])
        run_step_subprocess("prepare", configs["int8"], a.work / "int8")
        models = speed_only_models(a.work, configs["int8"])
    elif a.skip_pipeline:
        configs = {s: a.work / f"{s}.yaml" for s in SCHEMES}
        missing = [str(c) for c in configs.values() if not c.is_file()]
        if missing:
            raise SystemExit(f"--skip-pipeline: {missing} not found; run without --skip-pipeline first")
        models = trained_models(a.work)
    else:
        configs = pipeline(a.work, a.config, every_eval_clip(a.config, overrides))
        models = trained_models(a.work)
    speed = speed_pass(a.work, configs["int8"], a.max_clips, models)
    profile_main(["--work", str(a.work / "profile")])
    results = collect(a.work, speed)
    results["mode"] = "speed-only (untrained base model, PTQ exports)" if a.speed_only else "full (QAT models)"
    write_outputs(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
