"""Training speed of plain fine-tuning vs int8 / int4 QAT, full model vs frozen encoder, side by side.

    .venv/bin/python -m benchmarks.train_speed [--config demo] [--steps 3] [--out benchmarks/train_speed.json]

Each variant runs in its own process (clean peak RSS) through the train step's own core
(steps/train_loop.py Trainer: the code benchmarks/gpu_probe.py drives on a GPU), with the model,
batch size, gradient accumulation, precision, checkpointing and compile setting of the config's
train section, on synthetic log-mel
inputs (teacher-forced training cost depends on shapes, not content) and `--label-tokens` labels.
Variants `torchao-int8` / `torchao-int4` time torchao's own QATConfig for comparison.

It also measures the grid gap (on the model's real weights): a weight already sitting on
torchao's grid, rounded again by ONNX Runtime's grid, moves by this fraction of the plain PTQ
error; 0 for steps/fake_quant.py's ORT-aligned grid (what QAT learned survives the export).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from contract.config import load_config
from contract.quant_spec import QuantSpec
from steps import fake_quant
from steps.train_loop import Recipe, Trainer

REPO = Path(__file__).resolve().parent.parent

VARIANTS = ["plain", "int8", "int4", "torchao-int8", "torchao-int4"]


def torchao_prepare(model, scheme: str, group_size: int) -> int:
    """torchao's QATConfig recipe on the same Linears (encoder/decoder blocks)."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    if scheme == "int8":
        cfg = QATConfig(activation_config=IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False),
                        weight_config=IntxFakeQuantizeConfig(torch.int8, "per_channel"), step="prepare")
    else:
        cfg = QATConfig(weight_config=IntxFakeQuantizeConfig(torch.int4, group_size=group_size), step="prepare")
    quantize_(model, cfg, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and ".layers." in fqn)
    return sum(type(m).__name__ == "FakeQuantizedLinear" for m in model.modules())


def one(config: str, variant: str, freeze: bool, steps: int, label_tokens: int, batch: int | None) -> dict:
    """One variant through the train step's own core (steps/train_loop.py Trainer) on synthetic batches."""
    from steps.models import load_model

    cfg = load_config(config)
    tc = cfg.train
    torch.manual_seed(0)
    model = load_model(cfg.model.name_or_path)
    n_tao = torchao_prepare(model, variant.split("-")[1], cfg.quant.group_size) if variant.startswith("torchao-") else 0
    quant = (QuantSpec.of(variant, cfg.quant.group_size, cfg.quant.vocab_bits if variant == "int4" else 8)
             if variant in ("int8", "int4") else None)
    recipe = replace(Recipe.of(cfg), quant=quant, freeze_encoder=freeze, learning_rate=1e-6)
    trainer = Trainer(model, recipe, total_steps=steps + 1)
    b, mels = batch or tc.per_device_batch_size, model.config.num_mel_bins
    data = {"input_features": torch.randn(b, mels, 2 * model.config.max_source_positions),
            "labels": torch.randint(0, 50000, (b, label_tokens))}
    times, cpu_times = [], []
    for i in range(steps + 1):  # the first step warms up (and compiles, when compiled)
        c = time.process_time()
        r = trainer.step([data] * tc.grad_accum)
        if i:
            times.append(r["seconds"])
            cpu_times.append(time.process_time() - c)
    s = statistics.median(times)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if trainer.device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"variant": variant, "freeze_encoder": freeze, "fake_quant_modules": trainer.fake_quant_modules + n_tao,
            "compiled": trainer.compiled, "first_step_s": trainer.speed()["first_step_s"],
            "seconds_per_step": round(s, 3), "step_times": [round(x, 3) for x in times],
            # CPU seconds of this process (all threads): less sensitive than wall time to a shared machine
            "cpu_seconds_per_step": round(statistics.median(cpu_times), 3),
            "samples_per_s": round(b * tc.grad_accum / s, 3), "peak_memory_mb": round(peak, 1),
            "trainable_params": sum(p.numel() for p in trainer.trainable),
            "precision": trainer.precision, "device": str(trainer.device), "threads": torch.get_num_threads()}


def grid_gap(config: str, group_size: int) -> dict:
    """ORT re-rounding of weights that sit on torchao's grid, relative to plain PTQ error."""
    from torchao.quantization.qat import IntxFakeQuantizeConfig
    from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer

    from steps.models import load_model

    model = load_model(load_config(config).model.name_or_path)
    ws = [m.weight.detach() for n, m in model.named_modules()
          if isinstance(m, torch.nn.Linear) and ".layers." in n]
    ort = {"int8": fake_quant.fake_quant_weight_int8, "int4": lambda w: fake_quant.fake_quant_weight_blocks(w, group_size)}
    tao = {"int8": IntxFakeQuantizer(IntxFakeQuantizeConfig(torch.int8, "per_channel")),
           "int4": IntxFakeQuantizer(IntxFakeQuantizeConfig(torch.int4, group_size=group_size))}
    out = {}
    for scheme in ("int8", "int4"):
        moved = ptq = same = total = ours = 0.0
        for w in ws:
            w_tao = tao[scheme](w)
            moved += (ort[scheme](w_tao) - w_tao).pow(2).sum().item()
            ptq += (ort[scheme](w) - w).pow(2).sum().item()
            ours += (ort[scheme](ort[scheme](w)) - ort[scheme](w)).pow(2).sum().item()
            same += (ort[scheme](w_tao) == w_tao).sum().item()
            total += w.numel()
        out[scheme] = {"torchao_grid_error_vs_ptq": round((moved / ptq) ** 0.5, 4),
                       "aligned_grid_error_vs_ptq": round((ours / ptq) ** 0.5, 4),
                       "torchao_values_kept_by_ort": round(same / total, 4), "linears": len(ws)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="demo")
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps per variant (after 1 warm-up)")
    ap.add_argument("--label-tokens", type=int, default=40)
    ap.add_argument("--batch", type=int, help="micro-batch size (default: the config's per_device_batch_size)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--freeze", default="false,true", help="freeze_encoder values to time")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "train_speed.json")
    ap.add_argument("--one", nargs=2, metavar=("VARIANT", "FREEZE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args.config, args.one[0], args.one[1] == "true", args.steps,
                                         args.label_tokens, args.batch)))
        return 0
    cfg = load_config(args.config)
    results = []
    for freeze in args.freeze.split(","):
        for variant in args.variants.split(","):
            proc = subprocess.run([sys.executable, "-m", "benchmarks.train_speed", "--config", args.config, "--steps", str(args.steps),
                                   "--label-tokens", str(args.label_tokens), "--one", variant, freeze]
                                  + (["--batch", str(args.batch)] if args.batch else []),
                                  capture_output=True, text=True, cwd=REPO)
            line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode or not line:
                print(proc.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"variant {variant} (freeze_encoder={freeze}) failed")
            r = json.loads(line[0][7:])
            results.append(r)
            print(f"{variant:13s} freeze_encoder={freeze:5s} {r['seconds_per_step']:7.2f} s/step "
                  f"({r['cpu_seconds_per_step']:.1f} CPU s) "
                  f"{r['samples_per_s']:6.2f} samples/s  peak {r['peak_memory_mb']:.0f} MB  fq={r['fake_quant_modules']}",
                  flush=True)
    report = {"config": args.config, "load_average": os.getloadavg(), "model": cfg.model.name_or_path,
              "batch": args.batch or cfg.train.per_device_batch_size, "grad_accum": cfg.train.grad_accum,
              "label_tokens": args.label_tokens, "timed_steps": args.steps, "results": results,
              "grid_gap": grid_gap(args.config, cfg.quant.group_size),
              "command": " ".join(["python -m benchmarks.train_speed"] + sys.argv[1:])}
    print(json.dumps(report["grid_gap"], indent=1))
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
