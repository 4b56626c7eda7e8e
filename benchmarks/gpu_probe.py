"""Training-speed probe: the train step's own core (steps/train_loop.py Trainer) on synthetic batches.

On a CUDA machine, from the repository root, one command writes benchmarks/gpu.json:

    python -m benchmarks.gpu_probe

Defaults: whisper-large-v3-distil-fr shapes (32 encoder / 2 decoder layers, d_model 1280, 128 mel
bins, 30 s inputs), 96 label tokens, micro-batch 8 (configs/int8.yaml's), gradient checkpointing
on, bf16 autocast, fused AdamW: the train step's defaults. Modes: plain fine-tuning, int8 and int4
QAT, each eager and compiled (plain_eager is the baseline of `speedup_vs_plain_eager`).

Per mode: the first step (compilation included) apart; then `--warmup` steps, then `--steps` timed
steps: samples/s, s/step, peak GPU memory, model TFLOP/s and MFU (FLOPs per sample from
steps/train_loop.py flops_per_sample; peak dense bf16 TFLOP/s of the GPU from infra/gpu_speed.csv
or --peak-tflops). A mode that runs out of memory is recorded as such; the others still run.

`--nproc N` (N > 1) then runs the same modes on N ranks under torchrun with DistributedDataParallel and
adds each mode's samples/s on N ranks and scaling efficiency (benchmarks/gpu_probe_ddp.py);
`--record` writes that efficiency into infra/gpu_scaling.csv (one mode, GPU runs only).

What it needs on the machine: torch and transformers only (no pydantic, datasets, torchvision or
torchao; `--optimizer adamw8bit` needs torchao). `--shapes tiny` runs in seconds on a CPU (the test).
"""
from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

from benchmarks import gpu_probe_ddp as ddp

REPO = Path(__file__).resolve().parent.parent
GPU_TABLE = REPO / "infra" / "gpu_speed.csv"

SHAPES = {
    # bofenghuang/whisper-large-v3-distil-fr-v0.2 (756M parameters)
    "large-v3-distil": dict(d_model=1280, encoder_layers=32, decoder_layers=2, encoder_attention_heads=20,
                            decoder_attention_heads=20, encoder_ffn_dim=5120, decoder_ffn_dim=5120,
                            num_mel_bins=128, vocab_size=51866, max_source_positions=1500, max_target_positions=448),
    "tiny": dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                 encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=80, vocab_size=51865,
                 max_source_positions=1500, max_target_positions=448),
}
SCHEMES = {"plain": None, "int8": "int8", "int4": "int4"}
MODES = tuple(f"{s}_{c}" for s in SCHEMES for c in ("eager", "compiled"))


def peak_tflops(device_name: str, table: Path = GPU_TABLE) -> tuple[float | None, str]:
    """Dense bf16 peak of the GPU named `device_name` (torch.cuda.get_device_name) from the GPU table."""
    if not table.is_file():
        return None, f"{table} missing"
    rows = list(csv.DictReader(table.open()))
    name = device_name.upper()
    hits = [r for r in rows if all(part in name for part in r["gpu_name"].upper().split())]
    if not hits:
        return None, f"{device_name!r} not in {table.name}: pass --peak-tflops"
    best = max(hits, key=lambda r: len(r["gpu_name"]))  # "H100 SXM" before "H100"
    return float(best["bf16_tflops"]), f"{table.name}: {best['gpu_name']}"


def synthetic_batch(shapes: dict, batch: int, label_tokens: int, seed: int = 0) -> dict:
    """Log-mel-shaped noise and random label ids: training cost depends on shapes, not content."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return {"input_features": torch.randn(batch, shapes["num_mel_bins"], 2 * shapes["max_source_positions"], generator=g),
            "labels": torch.randint(0, shapes["vocab_size"] - 1600, (batch, label_tokens), generator=g)}


def probe_mode(mode: str, shapes: dict, batch: int, steps: int, warmup: int, label_tokens: int,
               checkpointing: bool, optimizer: str, peak: float | None) -> dict:
    """One mode through steps.train_loop.Trainer: what the train step runs, minus data and checkpoints."""
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from contract.quant_spec import QuantSpec
    from steps import distributed
    from steps.train_loop import Recipe, Trainer, flops_per_sample

    scheme, how = mode.rsplit("_", 1)
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = WhisperForConditionalGeneration(WhisperConfig(**shapes))
    world = distributed.world_size()  # under torchrun: every rank trains its own micro-batch of each step
    recipe = Recipe(quant=QuantSpec.of(SCHEMES[scheme]) if SCHEMES[scheme] else None, gradient_checkpointing=checkpointing,
                    compile=how == "compiled", optimizer=optimizer, learning_rate=1e-5, grad_accum=world)
    trainer = Trainer(model, recipe, total_steps=1 + warmup + steps)  # DDP around the model when world > 1
    cuda = trainer.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    data = synthetic_batch(shapes, batch, label_tokens)
    first = trainer.step([data])
    for _ in range(warmup):
        trainer.step([data])
    timed = [trainer.step([data]) for _ in range(steps)]
    dt = sum(r["seconds"] for r in timed)
    sps = batch * steps * world / dt
    flops = flops_per_sample(model.config, label_tokens)["train_flops"]
    out = {"samples_per_s": round(sps, 3), "s_per_step": round(dt / steps, 4),
           "first_step_s": round(first["seconds"], 2), "compiled": trainer.compiled,
           "fake_quant_linears": trainer.fake_quant_modules, "final_loss": round(timed[-1]["loss"], 4),
           "model_tflops_per_s": round(flops * sps / 1e12, 2),
           "mfu": round(flops * sps / (peak * 1e12), 4) if peak else None}
    if cuda:
        out["peak_vram_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    else:
        import resource

        out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    del trainer, model
    return out


def run_probe(shapes_name: str, batch: int, steps: int, warmup: int, label_tokens: int, checkpointing: bool,
              modes=MODES, optimizer: str = "adamw", peak: float | None = None, on_result=None) -> dict:
    """Every mode in turn; `on_result(report)` after each (main writes the file: a run cut short keeps
    the modes it finished)."""
    import torch

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.machine()})"
    source = "--peak-tflops"
    if peak is None and cuda:
        peak, source = peak_tflops(device)
    results: dict = {}
    report = _report(shapes_name, batch, steps, warmup, label_tokens, checkpointing, optimizer, device, cuda, peak,
                     source, results)
    for mode in modes:
        try:
            results[mode] = probe_mode(mode, SHAPES[shapes_name], batch, steps, warmup, label_tokens,
                                       checkpointing, optimizer, peak)
        except torch.cuda.OutOfMemoryError as e:
            results[mode] = {"error": f"out of memory at batch {batch}: {str(e).splitlines()[0]}"}
        except Exception as e:  # noqa: BLE001 - one mode failing (a compiler error) must not lose the others
            traceback.print_exc()
            results[mode] = {"error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"}
        finally:
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        if not ddp.in_torchrun() or int(os.environ["RANK"]) == 0:
            print(mode, json.dumps(results[mode]), flush=True)
        base = results.get("plain_eager", {}).get("samples_per_s")
        for r in results.values():
            if base and "samples_per_s" in r:
                r["speedup_vs_plain_eager"] = round(r["samples_per_s"] / base, 3)
        if on_result:
            on_result(report)
    return report


def _report(shapes_name: str, batch: int, steps: int, warmup: int, label_tokens: int, checkpointing: bool,
            optimizer: str, device: str, cuda: bool, peak: float | None, source: str, results: dict) -> dict:
    import torch
    import transformers
    from transformers import WhisperConfig

    from steps.train_loop import flops_per_sample

    return {
        "device": device, "is_gpu": cuda, "shapes": shapes_name,
        "batch": batch, "steps": steps, "warmup": warmup, "label_tokens": label_tokens,
        "gradient_checkpointing": checkpointing, "optimizer": optimizer,
        "precision": "bf16 autocast" if cuda else "fp32",
        "train_flops_per_sample": flops_per_sample(WhisperConfig(**SHAPES[shapes_name]), label_tokens),
        "peak_bf16_tflops": peak, "peak_source": source if peak else None,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "results": results,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", choices=sorted(SHAPES), default="large-v3-distil")
    p.add_argument("--batch", type=int, default=8, help="micro-batch (configs/int8.yaml: 8)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (compiling) one")
    p.add_argument("--label-tokens", type=int, default=96)
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                   help="turn gradient checkpointing off (the train step's default is on)")
    p.add_argument("--optimizer", choices=("adamw", "adamw8bit"), default="adamw")
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak of this GPU (default: infra/gpu_speed.csv)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {MODES}")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "gpu.json")
    p.add_argument("--nproc", type=int, default=1, help="also run the modes on N ranks (torchrun + DDP) and report "
                   "the scaling efficiency")
    p.add_argument("--record", action="store_true", help="write the measured efficiency into infra/gpu_scaling.csv "
                   "(one mode, a GPU machine)")
    a = p.parse_args(argv)
    modes = [m for m in a.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        p.error(f"unknown modes {bad}: use {MODES}")
    if a.nproc < 1 or (a.record and (a.nproc < 2 or len(modes) != 1)):
        p.error("--nproc must be at least 1; --record needs --nproc 2 or more and exactly one of --modes")
    if ddp.in_torchrun():
        rank, world = ddp.init_rank()
        report = run_probe(a.shapes, a.batch, a.steps, a.warmup, a.label_tokens, a.checkpointing, modes,
                           a.optimizer, a.peak_tflops)
        report["world_size"] = world
        if rank == 0:
            a.out.write_text(json.dumps(report, indent=2) + "\n")
        import torch.distributed as dist

        dist.destroy_process_group()
        return 0
    t = time.time()
    command = " ".join(["python -m benchmarks.gpu_probe", *(argv if argv is not None else sys.argv[1:])])

    def write(report: dict) -> None:
        report.update(wall_s=round(time.time() - t, 1), command=command)
        a.out.write_text(json.dumps(report, indent=2) + "\n")

    if a.nproc > 1:
        ddp.same_threads_as_ranks()
    report = run_probe(a.shapes, a.batch, a.steps, a.warmup, a.label_tokens, a.checkpointing, modes,
                       a.optimizer, a.peak_tflops, on_result=write)
    if a.nproc > 1:
        child = ["--shapes", a.shapes, "--batch", str(a.batch), "--steps", str(a.steps), "--warmup", str(a.warmup),
                 "--label-tokens", str(a.label_tokens), "--optimizer", a.optimizer, "--modes", ",".join(modes),
                 *([] if a.checkpointing else ["--no-checkpointing"]),
                 *(["--peak-tflops", str(a.peak_tflops)] if a.peak_tflops else [])]
        report.update(ddp.run_scaling(child, a.nproc, report))
        write(report)
        print("scaling", json.dumps(report["scaling"]), flush=True)
        if a.record:
            got = report["scaling"][modes[0]]
            if not report["is_gpu"] or not got["efficiency"]:
                print("not recorded: --record needs a GPU run with a measured efficiency", file=sys.stderr)
                return 1
            ddp.record(ddp.SCALING_TABLE, a.nproc, got["efficiency"],
                       f"measured: {command} on {a.nproc} x {report['device']} ({modes[0]})")
            print(f"recorded {a.nproc} GPUs: efficiency {got['efficiency']:g} in {ddp.SCALING_TABLE}")
    if not report["is_gpu"] and a.shapes != "tiny":
        print("warning: no CUDA device; these are CPU figures", file=sys.stderr)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
