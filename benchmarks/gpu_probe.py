"""Training-speed probe: plain fine-tuning vs int8 and int4 QAT (steps/fake_quant.py) on random weights.

On a CUDA machine, with whisper-large-v3-distil-fr shapes (32 encoder layers, 2 decoder layers,
d_model 1280, 128 mel bins, 30 s inputs, 96 label tokens), bf16 autocast, fused AdamW:

    python -m benchmarks.gpu_probe                 # writes benchmarks/gpu.json
    python -m benchmarks.gpu_probe --shapes tiny   # seconds on a CPU (what the test runs)

Per mode: samples/s over timed steps (warm-up excluded), seconds per step, peak VRAM (CUDA) or
peak RSS (CPU). An out-of-memory mode is recorded as such and the others still run.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SHAPES = {
    # bofenghuang/whisper-large-v3-distil-fr-v0.2 (756M parameters)
    "large-v3-distil": dict(d_model=1280, encoder_layers=32, decoder_layers=2, encoder_attention_heads=20,
                            decoder_attention_heads=20, encoder_ffn_dim=5120, decoder_ffn_dim=5120,
                            num_mel_bins=128, vocab_size=51866, max_source_positions=1500, max_target_positions=448),
    "tiny": dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                 encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=80, vocab_size=51865,
                 max_source_positions=1500, max_target_positions=448),
}
MODES = ("plain", "int8_qat", "int4_qat")


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def probe_mode(mode: str, shapes: dict, batch: int, steps: int, warmup: int, label_tokens: int,
               checkpointing: bool, device: str) -> dict:
    """Train `steps` timed steps of one mode on random data; returns samples/s and peak memory."""
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from steps import fake_quant
    from contract.config import QuantConfig

    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(WhisperConfig(**shapes)).to(device)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    n_fake = 0
    if mode != "plain":
        n_fake = fake_quant.prepare(model, QuantConfig(scheme=mode.split("_")[0], group_size=32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")
    feats = torch.randn(batch, shapes["num_mel_bins"], 2 * shapes["max_source_positions"], device=device)
    labels = torch.randint(0, shapes["vocab_size"] - 1600, (batch, label_tokens), device=device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)

    def step() -> float:
        with amp:
            loss = model(input_features=feats, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    losses = [step() for _ in range(steps)]
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    out = {"samples_per_s": round(batch * steps / dt, 3), "s_per_step": round(dt / steps, 4),
           "fake_quant_linears": n_fake, "final_loss": round(losses[-1], 4)}
    if device == "cuda":
        out["peak_vram_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    else:
        out["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    return out


def run_probe(shapes_name: str, batch: int, steps: int, warmup: int, label_tokens: int, checkpointing: bool,
              modes=MODES, device: str | None = None) -> dict:
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    results = {}
    for mode in modes:
        try:
            results[mode] = probe_mode(mode, SHAPES[shapes_name], batch, steps, warmup, label_tokens,
                                       checkpointing, device)
        except torch.cuda.OutOfMemoryError as e:
            results[mode] = {"error": f"out of memory at batch {batch}: {str(e).splitlines()[0]}"}
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()
        print(mode, json.dumps(results[mode]), flush=True)
    return {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({platform.machine()})",
        "is_gpu": device == "cuda",
        "shapes": shapes_name,
        "batch": batch, "steps": steps, "warmup": warmup, "label_tokens": label_tokens,
        "gradient_checkpointing": checkpointing,
        "precision": "bf16 autocast" if device == "cuda" else "fp32",
        "torch": torch.__version__,
        "results": results,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", choices=sorted(SHAPES), default="large-v3-distil")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--label-tokens", type=int, default=96)
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (int8 QAT needs it at batch 16)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {MODES}")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "gpu.json")
    a = p.parse_args(argv)
    modes = [m for m in a.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        p.error(f"unknown modes {bad}: use {MODES}")
    report = run_probe(a.shapes, a.batch, a.steps, a.warmup, a.label_tokens, a.checkpointing, modes)
    if not report["is_gpu"] and a.shapes != "tiny":
        print("warning: no CUDA device; these are CPU figures", file=sys.stderr)
    a.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
