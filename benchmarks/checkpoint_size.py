"""Training checkpoints at the real shapes: bytes, save time, and what the copy home moves per hour.

    python -m benchmarks.checkpoint_size [--config int8] [--optimizers adamw,adamw8bit]

Builds whisper-large-v3-distil-fr's shapes with random weights (fp32, QAT-prepared like the train
step), gives each optimizer its state in its own format (AdamW: fp32 moments; torchao AdamW8bit:
8-bit blocks, as its first step creates them; values do not change the size), and writes one
checkpoint with steps/train.py's own save_checkpoint into a temporary folder. Measured on
whatever runs it (this machine's CPU and disk, say so). Then, for the config: optimizer steps per
hour at the expected samples/s of the reference GPU (infra/train_throughput.csv), checkpoints per
hour (every train.save_every steps; the copy home takes the newest one every
machine.checkpoint_sync_every_s at most), bytes home per hour and their price at --usd-per-gb.
Writes benchmarks/checkpoint.json.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def fill_state(optimizer: torch.optim.Optimizer) -> None:
    """The optimizer's per-parameter state as its first step creates it (without a backward pass)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if type(optimizer).__name__ == "AdamW8bit":
                optimizer.state[p] = {"step": torch.tensor(1.0), "exp_avg": optimizer._new_buffer(p, True),
                                      "exp_avg_sq": optimizer._new_buffer(p, False)}
            else:
                optimizer.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p),
                                      "exp_avg_sq": torch.zeros_like(p)}


def measure(optimizer_name: str, scheme: str, root: Path) -> dict:
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from benchmarks.gpu_probe import SHAPES
    from steps.train import save_checkpoint, tree_bytes
    from contract.quant_spec import QuantSpec
    from steps.train_loop import Recipe, make_optimizer
    from steps import fake_quant

    model = WhisperForConditionalGeneration(WhisperConfig(**SHAPES["large-v3-distil"]))
    fake_quant.prepare(model, QuantSpec.of(scheme))
    opt = make_optimizer(model, Recipe(quant=QuantSpec.of(scheme), optimizer=optimizer_name), torch.device("cpu"))
    fill_state(opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    t = time.perf_counter()
    path = save_checkpoint(root, 1, model, opt, sched, 4, "benchmark")
    dt = time.perf_counter() - t
    files = {p.name: p.stat().st_size for p in sorted(path.iterdir())}
    out = {"optimizer": optimizer_name, "params": sum(p.numel() for p in model.parameters()),
           "checkpoint_bytes": tree_bytes(path), "files": files, "save_s": round(dt, 2)}
    del model, opt, sched
    gc.collect()
    return out


def per_hour(ckpt_bytes: int, samples_per_s: float, samples_per_step: int, save_every: int, sync_every_s: float,
             usd_per_gb: float) -> dict:
    steps_h = samples_per_s * 3600 / samples_per_step
    saved_h = steps_h / save_every
    copied_h = min(saved_h, 3600 / sync_every_s)  # the sync copies only the newest, only when new
    gb_h = copied_h * ckpt_bytes / 1e9
    return {"optimizer_steps_per_hour": round(steps_h), "checkpoints_saved_per_hour": round(saved_h, 2),
            "checkpoints_copied_home_per_hour": round(copied_h, 2), "gb_home_per_hour": round(gb_h, 2),
            "usd_per_hour_at": {"usd_per_gb": usd_per_gb, "usd": round(gb_h * usd_per_gb, 3)},
            "training_lost_on_preemption_s_max": round(max(save_every / steps_h * 3600, sync_every_s))}


def main(argv=None) -> int:
    from contract.config import load_config
    from infra.gpu_speed import reference_speed

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="int8")
    ap.add_argument("--optimizers", default="adamw,adamw8bit")
    ap.add_argument("--usd-per-gb", type=float, default=0.02, help="bandwidth price for the $/h figure")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "checkpoint.json")
    a = ap.parse_args(argv)
    cfg = load_config(a.config)
    tc = cfg.train
    ref = reference_speed(cfg.quant.scheme, tc.per_device_batch_size, tc.compile is not False)
    results = []
    with tempfile.TemporaryDirectory(dir=REPO, prefix=".checkpoint-size-") as tmp:  # this disk, not a tmpfs
        for name in a.optimizers.split(","):
            r = measure(name, cfg.quant.scheme, Path(tmp) / name)
            r["home"] = per_hour(r["checkpoint_bytes"], ref["samples_per_s"], tc.per_device_batch_size * tc.grad_accum,
                                 tc.save_every, cfg.machine.checkpoint_sync_every_s, a.usd_per_gb)
            results.append(r)
            print(json.dumps(r), flush=True)
    report = {"config": a.config, "shapes": "large-v3-distil (random weights, fp32)",
              "measured_on": f"cpu ({platform.machine()}), local disk", "torch": torch.__version__,
              "expected_speed": ref, "save_every": tc.save_every,
              "checkpoint_sync_every_s": cfg.machine.checkpoint_sync_every_s, "results": results,
              "command": " ".join(["python -m benchmarks.checkpoint_size", *(argv if argv is not None else sys.argv[1:])])}
    a.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
