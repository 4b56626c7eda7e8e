"""GPU serving probe: fp16 vs int8 vs int4 inference of one model shape, like for like on one device.

On a CUDA machine, whisper-large-v3-distil-fr shapes (benchmarks/gpu_probe.py SHAPES), random weights:

    python -m benchmarks.gpu_serve                       # PyTorch fp16 / torchao int8, int4 -> benchmarks/gpu_serve.json
    python -m benchmarks.gpu_serve --onnx                # + ONNX fp16 / int8 / int4 on the CUDA EP
    python -m benchmarks.gpu_serve --shapes tiny --device cpu --onnx --out /tmp/s.json   # seconds on a CPU (the test)

Each variant runs in a fresh process (clean peak memory): the model is built from the same seed, put
in its precision (steps/serving.py), then timed on random 30 s log-mel features: encoder ms, decoder
ms/token over --forced-tokens greedy steps with the KV cache (EOS never ends it: the same token count
for every variant), latency per clip (encoder + prompt + forced tokens), RTF, device memory the process
holds after the clip (CUDA: total - free growth, counts PyTorch's cache and ORT's arena alike), and
weight size. Speed is relative to fp16 on the same device only. The ONNX int8 model on the CUDA EP
also records which nodes ONNX Runtime put on the CPU.

Needs torch, transformers, onnxruntime(-gpu) for --onnx plus onnx, optimum-onnx (export) and
onnx-ir (int4 quantizer); torchao for the PyTorch int8/int4 rows. Neither datasets nor pydantic.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.gpu_probe import SHAPES  # noqa: E402
from contract.quant_spec import QuantSpec  # noqa: E402
from steps import serving  # noqa: E402

PROMPT = (50258, 50265, 50359, 50363)  # <|startoftranscript|><|fr|><|transcribe|><|notimestamps|>
TORCH_VARIANTS = {"torch_fp16": "fp16", "torch_int8_weight_only": "int8_weight_only",
                  "torch_int4_weight_only": "int4_weight_only"}
ONNX_VARIANTS = ("onnx_fp16", "onnx_int8", "onnx_int4")
CLIP_S = 30.0


def build_model(shapes: dict, seed: int = 0):
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(seed)
    cfg = WhisperConfig(**shapes, decoder_start_token_id=PROMPT[0], pad_token_id=50257, eos_token_id=50257)
    return WhisperForConditionalGeneration(cfg).eval()


def forced_decode(model, enc, n: int, device: str) -> list[float]:
    """Prompt then n greedy steps with the KV cache; seconds per generated token step."""
    import torch

    past, times = None, []
    tok = torch.tensor([list(PROMPT)], device=device)
    with torch.inference_mode():
        out = model(encoder_outputs=enc, decoder_input_ids=tok, past_key_values=past, use_cache=True)
        past, pos = out.past_key_values, len(PROMPT)
        for _ in range(n):
            tok = out.logits[:, -1:].argmax(-1).to(device)
            sync(device)
            t = time.perf_counter()
            out = model(encoder_outputs=enc, decoder_input_ids=tok, past_key_values=past, use_cache=True,
                        cache_position=torch.tensor([pos], device=device))
            sync(device)
            times.append(time.perf_counter() - t)
            past, pos = out.past_key_values, pos + 1
    return times


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def load_variant(name: str, shapes: dict, device: str, onnx_dirs: dict):
    """(model, encoder callable, input dtype, size MB, provider) for one variant."""
    import torch

    if name in TORCH_VARIANTS:
        model = serving.place_torch_model(build_model(shapes), device, TORCH_VARIANTS[name])
        provider = f"torch-{device}-{TORCH_VARIANTS[name]}"
        if device == "cpu" and TORCH_VARIANTS[name] == "fp16":
            # the CPU has no fp16 serving path: a CPU run only checks the code, in fp32, and says so
            model, provider = model.float(), f"torch-{device}-fp32"
        dtype = next(model.parameters()).dtype
        return model, lambda f: model.model.encoder(input_features=f), dtype, serving.weights_mb(model), provider
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForSpeechSeq2Seq

    provider = serving.ort_provider(device)
    if provider is None:
        raise RuntimeError(f"this onnxruntime has no execution provider for {device} (install onnxruntime-gpu)")
    so = ort.SessionOptions()
    d = onnx_dirs[name]
    merged = name != "onnx_fp16"
    model = ORTModelForSpeechSeq2Seq.from_pretrained(d, provider=provider, session_options=so, use_merged=merged)
    # the unmerged fp16 decoders hold every decoder weight twice: count one copy, as merged dirs do
    files = [f for f in Path(d).iterdir() if ".onnx" in f.name and (merged or not f.name.startswith("decoder_with_past"))]
    size = round(sum(f.stat().st_size for f in files) / 1e6, 3)
    return model, lambda f: model.encoder(input_features=f, attention_mask=None), torch.float32, size, provider


def measure(name: str, shapes: dict, device: str, forced: int, reps: int, onnx_dirs: dict) -> dict:
    """Child body: one variant, timed; device memory over the process's baseline."""
    import torch

    if device == "cuda":
        torch.zeros(1, device="cuda")
        before = serving.cuda_memory_mb()
    model, encode, dtype, size, provider = load_variant(name, shapes, device, onnx_dirs)
    feats = torch.randn(1, shapes["num_mel_bins"], 2 * shapes["max_source_positions"], generator=torch.Generator().manual_seed(1))
    feats = feats.to(device, dtype=dtype)
    enc_s, tok_s, lat_s = [], [], []
    for i in range(reps + 1):  # the first run is warm-up
        sync(device)
        t = time.perf_counter()
        with torch.inference_mode():
            enc = encode(feats)
        sync(device)
        t_enc = time.perf_counter() - t
        steps = forced_decode(model, enc, forced, device)
        total = time.perf_counter() - t
        if i:
            enc_s.append(t_enc)
            tok_s.append(statistics.median(steps))
            lat_s.append(total)
    row = {**serving.describe(device, provider), "size_mb": size,
           "encoder_ms": round(1000 * statistics.median(enc_s), 2),
           "decoder_ms_per_token": round(1000 * statistics.median(tok_s), 3),
           "latency_s": round(statistics.median(lat_s), 4), "rtf": round(statistics.median(lat_s) / CLIP_S, 5),
           "forced_tokens": forced, "reps": reps}
    if device == "cuda":
        row["peak_vram_mb"] = round(serving.cuda_memory_mb() - before, 1)
        row["torch_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return row


def export_onnx(shapes: dict, work: Path, log=print) -> dict:
    """The random model through convert's own export and quantizers, and an fp16 copy of the fp32 export."""
    from steps import convert
    from steps.fuse_attention import fuse_encoder_file

    src, fp32 = work / "torch", work / "onnx_fp32"
    dirs = {"onnx_fp16": work / "onnx_fp16", "onnx_int8": work / "onnx_int8", "onnx_int4": work / "onnx_int4"}
    if all((d / convert.ENCODER).is_file() for d in dirs.values()):
        return {k: str(v) for k, v in dirs.items()}
    build_model(shapes).save_pretrained(src)
    t = time.time()
    convert.export(src, fp32)
    log(f"exported in {time.time() - t:.0f}s")
    for scheme in ("int8", "int4"):
        # int4 as a GPU user configures it (quant.encoder_layout nbits: MatMulNBits has a CUDA kernel)
        spec = QuantSpec.of(scheme, encoder_layout="nbits") if scheme == "int4" else QuantSpec.of(scheme)
        convert.quantize_dir(fp32, dirs[f"onnx_{scheme}"], spec)
    to_fp16_dir(fp32, dirs["onnx_fp16"])
    convert.finish_fp32_dir(fp32)
    for d in dirs.values():
        fuse_encoder_file(d / convert.ENCODER, shapes["encoder_attention_heads"])
    return {k: str(v) for k, v in dirs.items()}


def to_fp16_dir(src: Path, dst: Path) -> None:
    """fp16 weights and compute, fp32 inputs and outputs, of the encoder and the two unmerged decoders
    (ORT's fp16 converter breaks the merged decoder's If branches; optimum loads unmerged ones alike)."""
    import shutil

    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from steps.convert import DECODER, DECODER_WITH_PAST, ENCODER

    dst.mkdir(parents=True, exist_ok=True)
    for name in (ENCODER, DECODER, DECODER_WITH_PAST):
        model = convert_float_to_float16(onnx.load(str(src / name)), keep_io_types=True, disable_shape_infer=True)
        onnx.save(model, str(dst / name), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=name + "_data", size_threshold=1024)
    for f in src.iterdir():
        if ".onnx" not in f.name:
            shutil.copy2(f, dst / f.name)


def _child() -> None:
    spec = json.loads(sys.stdin.read())
    row = measure(spec["name"], spec["shapes"], spec["device"], spec["forced"], spec["reps"], spec["onnx_dirs"])
    print("ROW " + json.dumps(row), flush=True)


def run_variant(name: str, spec: dict, timeout: float) -> dict:
    proc = subprocess.run([sys.executable, "-c", "from benchmarks.gpu_serve import _child; _child()"],
                          input=json.dumps({**spec, "name": name}), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    for line in proc.stdout.splitlines():
        if line.startswith("ROW "):
            return json.loads(line[4:])
    err = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
    return {"error": err[-400:]}


def compare(rows: dict) -> dict:
    """Ratios against fp16 on the same device (every row here is one device)."""
    base = rows.get("torch_fp16", {})
    out = {}
    for name, r in rows.items():
        if "error" in r or "error" in base or not base:
            continue
        out[name] = {"speed_vs_fp16": round(base["latency_s"] / r["latency_s"], 3),
                     "decoder_token_vs_fp16": round(r["decoder_ms_per_token"] / base["decoder_ms_per_token"], 3),
                     "size_vs_fp16": round(r["size_mb"] / base["size_mb"], 3)}
        if r.get("peak_vram_mb") and base.get("peak_vram_mb"):
            out[name]["vram_vs_fp16"] = round(r["peak_vram_mb"] / base["peak_vram_mb"], 3)
    return out


def targets(ratios: dict) -> dict:
    """issue 13's GPU targets, from the measured ratios (None: a variant was not measured)."""
    def best(prefix, key):
        vals = [r[key] for n, r in ratios.items() if prefix in n and key in r]
        return min(vals) if vals else None
    return {"int4_vram_le_0.35x_fp16": best("int4", "vram_vs_fp16"),
            "int4_decoder_token_le_fp16": best("int4", "decoder_token_vs_fp16"),
            "int8_latency_le_fp16": (lambda v: None if v is None else round(1 / v, 3))(
                max((r["speed_vs_fp16"] for n, r in ratios.items() if "int8" in n), default=None))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", choices=sorted(SHAPES), default="large-v3-distil")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--forced-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--onnx", action="store_true", help="also export and time ONNX fp16 / int8 / int4")
    p.add_argument("--work", type=Path, default=None, help="where the ONNX exports go (default: a temp dir)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per variant")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "gpu_serve.json")
    a = p.parse_args(argv)
    if a.device == "cuda":
        why = serving.cuda_usable()
        if why:
            print(f"GPU serving probe skipped: {why}")
            return 0
    shapes = SHAPES[a.shapes]
    names = list(TORCH_VARIANTS)
    onnx_dirs: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        if a.onnx:
            onnx_dirs = export_onnx(shapes, a.work or Path(tmp))
            names += list(ONNX_VARIANTS)
        spec = {"shapes": shapes, "device": a.device, "forced": a.forced_tokens, "reps": a.reps, "onnx_dirs": onnx_dirs}
        rows = {}
        for name in names:
            rows[name] = run_variant(name, spec, a.timeout)
            print(name, json.dumps(rows[name]), flush=True)
        placement = {}
        if "onnx_int8" in onnx_dirs and a.device == "cuda" and serving.ort_provider("cuda"):
            from steps.convert import ENCODER, MERGED

            placement = {part: serving.node_placement(Path(onnx_dirs["onnx_int8"]) / part, "CUDAExecutionProvider")
                         for part in (ENCODER, MERGED)}
    ratios = compare(rows)
    import platform

    import torch

    report = {"command": "python -m benchmarks.gpu_serve " + " ".join(argv if argv is not None else sys.argv[1:]),
              "shapes": a.shapes, "device": serving.describe(a.device, "")["device_name"], "torch": torch.__version__,
              "python": platform.python_version(), "results": rows, "vs_fp16_same_device": ratios,
              "targets": targets(ratios), "onnx_int8_placement": placement}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
