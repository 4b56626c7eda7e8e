"""Train step: seq2seq fine-tuning of Whisper with quantization-aware training (steps/fake_quant.py).

Reads DIR/prepare/{train,dev}/, writes DIR/train/:
  checkpoints/step-N/   model, optimizer, scheduler, RNG and data position (last 2 kept)
  checkpoints-set-aside/<hash>/step-N/   checkpoints found here that another config hash wrote
                        (another learning rate, code or data): kept and named, never resumed
  history.jsonl         one line per optimizer step, one per evaluation
  model/                the converted plain transformers model + processor (what convert reads)

Data order is a pure function of (seed, epoch), and a checkpoint stores how many micro-batches
were consumed, so `--resume` continues exactly where the run stopped (compiled blocks too: labels
are padded to one length, so each compiled kernel depends on its batch shape alone). On N GPUs (or
train.nproc CPU processes) each rank takes its share of that order and rank 0 alone writes:
steps/distributed.py.

The model, QAT, checkpointing, compilation, optimizer and the optimizer step itself are
steps/train_loop.py's Trainer, the code benchmarks/gpu_probe.py times on a GPU. Metrics keep the
first step of the process (compilation) apart from the steady-state samples/s.
"""
from __future__ import annotations

import json
import math
import os
import random
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from contract.catalogue import CHECKPOINT_DIR, KEEP_CHECKPOINTS, SET_ASIDE_DIR, checkpoint_name, checkpoint_number
from contract.normalize import normalize_french
from contract.result_file import config_hash

from . import distributed, fake_quant
from .common import StepContext, StepError
from .train_data import EncoderCache, MicroBatches, Rows, load_split, loader
from .train_loop import Recipe, Trainer, autocast, eager, flops_per_sample


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model, processor, dev, batch_size: int, device, amp_dtype, language: str, task: str) -> dict:
    """Teacher-forced dev loss (token-weighted) and greedy-decoding corpus WER in percent."""
    import jiwer

    rows = Rows(dev, processor.feature_extractor)
    normalize = normalize_french  # the same text normalization as the evaluate step
    max_label = max(len(l) for l in dev["labels"])
    max_new = min(max_label + 8, model.config.max_target_positions - 8)
    was_training = model.training
    model.eval()
    loss_sum, tokens, hyps = 0.0, 0, []
    with eager():  # compiled blocks run eagerly here: generation changes shapes every token
        for start in range(0, len(dev), batch_size):
            batch = rows[list(range(start, min(start + batch_size, len(dev))))]
            feats, labels = batch["input_features"].to(device), batch["labels"].to(device)
            with autocast(device, amp_dtype):
                enc = model.model.encoder(feats)  # run once, shared by the loss and generation
                n = int((labels != -100).sum())
                loss_sum += float(model(encoder_outputs=enc, labels=labels).loss) * n
                tokens += n
                ids = model.generate(encoder_outputs=enc, language=language, task=task, max_new_tokens=max_new,
                                     use_cache=True)
            hyps += processor.tokenizer.batch_decode(ids, skip_special_tokens=True)
    model.train(was_training)
    pairs = [(normalize(r), normalize(h)) for r, h in zip(dev["text"], hyps)]
    pairs = [(r, h) for r, h in pairs if r.strip()]
    wer = 100.0 * jiwer.wer([r for r, _ in pairs], [h for _, h in pairs]) if pairs else None
    return {"dev_loss": loss_sum / max(tokens, 1), "dev_wer": wer, "examples": [h for h in hyps[:3]]}


# ---------------------------------------------------------------- checkpoints

def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _checkpoints(root: Path) -> list[tuple[int, Path]]:
    found = []
    for p in root.iterdir() if root.is_dir() else []:
        n = checkpoint_number(p.name)
        if n is not None and p.is_dir() and (p / "state.pt").is_file():
            found.append((n, p))
    return sorted(found)


def save_checkpoint(root: Path, step: int, model, optimizer, scheduler, micro: int, chash: str) -> Path | None:
    """Write checkpoints/step-N/ through a temporary directory and a rename; keep the last 2.
    Every rank calls it (their RNG states are gathered); rank 0 writes, the others get None."""
    rngs = distributed.gather(_rng_state())
    if distributed.rank():
        return None
    root.mkdir(parents=True, exist_ok=True)
    tmp, final = root / f".{checkpoint_name(step)}.tmp", root / checkpoint_name(step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(model.state_dict(), tmp / "model.pt")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    # state.pt last: a directory holding it is complete
    torch.save({"step": step, "micro_batches": micro, "config_hash": chash, "rng": rngs[0], "rng_ranks": rngs,
                "world_size": len(rngs)}, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for _, old in _checkpoints(root)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_hash(path: Path) -> str:
    """The config hash a checkpoint was written under ("unreadable" when its state cannot be read)."""
    try:
        return str(torch.load(path / "state.pt", weights_only=False)["config_hash"])
    except Exception:  # noqa: BLE001 - a damaged checkpoint is set aside like a foreign one
        return "unreadable"


def set_aside_foreign(ctx: StepContext, root: Path, chash: str) -> list[tuple[int, Path]]:
    """Move the checkpoints in `root` written under another config hash to
    <step dir>/checkpoints-set-aside/<their hash>/step-N (kept, named, never resumed); return the others.

    A re-run with a changed train.* (or code, data, model) finds the old run's checkpoints: it
    trains anew instead of refusing them or resuming a model trained under other settings."""
    kept = []
    for n, p in _checkpoints(root):
        theirs = checkpoint_hash(p)
        if theirs == chash:
            kept.append((n, p))
            continue
        dest = ctx.out / SET_ASIDE_DIR / theirs / p.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(p, dest)
        ctx.log(f"checkpoint {p.name} was written under config hash {theirs}, now {chash} (config, code, data "
                f"or model changed): set aside in {dest.relative_to(ctx.out)}, not resumed")
    return kept


def load_checkpoint(path: Path, model, optimizer, scheduler, chash: str) -> dict:
    state = torch.load(path / "state.pt", weights_only=False)
    if state["config_hash"] != chash:
        raise StepError(f"checkpoint {path} was written with another train config (hash {state['config_hash']}, "
                        f"now {chash}); run without --resume to start over")
    model.load_state_dict(torch.load(path / "model.pt", map_location="cpu"))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu"))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt"))
    rngs = state.get("rng_ranks", [state["rng"]])
    if distributed.rank() < len(rngs):  # a rank the writing run did not have keeps its fresh seed
        _set_rng_state(rngs[distributed.rank()])
    return state


# ---------------------------------------------------------------- the step

def _peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _read_history(path: Path, upto: int) -> list[dict]:
    """History lines of steps <= upto (lines written after the checkpoint are dropped on resume)."""
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["step"] <= upto]


def save_final(out: Path, model, processor) -> Path:
    """fake_quant.convert, then save_pretrained model + processor into `out` through a temporary directory."""
    model = fake_quant.convert(model)
    if model.is_gradient_checkpointing:
        model.gradient_checkpointing_disable()
    model.config.use_cache = True
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to("cpu").save_pretrained(tmp)
    processor.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def label_length(ds, max_target_positions: int) -> int:
    """The one length every batch's labels are padded to (the longest label of the split, rounded up
    to a multiple of 8): compiled blocks then see one decoder shape per run, so a kernel never depends
    on which batches came first; padding (-100) adds no loss and no gradient."""
    longest = max((len(l) for l in ds["labels"]), default=1)
    return min(max(8, -(-longest // 8) * 8), max_target_positions)


def run(ctx: StepContext) -> dict:
    from .models import load_model, load_processor

    cfg, tc = ctx.cfg, ctx.cfg.train
    save_every = min(tc.save_every, ctx.save_every or tc.save_every)  # the orchestrator may ask for more often
    prep = ctx.dir_of("prepare")
    train_ds, dev_ds = load_split(prep, "train"), load_split(prep, "dev")
    if len(train_ds) == 0:
        raise StepError(f"the prepared train split in {prep} is empty; check data.* and rerun prepare")
    distributed.init()
    lead, seed = distributed.rank() == 0, tc.seed + distributed.rank()  # each rank its own random stream
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

    model = load_model(cfg.model.name_or_path, revision=cfg.model.revision)
    processor = load_processor(cfg.model.name_or_path, revision=cfg.model.revision)
    batches = MicroBatches(len(train_ds), tc.per_device_batch_size, tc.seed)
    total = tc.max_steps or max(1, math.ceil(tc.epochs * batches.per_epoch / tc.grad_accum))
    trainer = Trainer(model, Recipe.of(cfg), total_steps=total)
    device, amp_dtype, precision = trainer.device, trainer.amp_dtype, trainer.precision
    optimizer, scheduler = trainer.optimizer, trainer.scheduler
    ctx.log(f"QAT {cfg.quant.scheme}: {trainer.fake_quant_modules} fake-quantized Linear layers; "
            f"optimizer {tc.optimizer}; blocks {'compiled' if trainer.compiled else 'eager'}")
    cache = EncoderCache.for_run(model, tc, len(train_ds), amp_dtype or torch.float32, ctx.log)
    trainer.encode = cache

    ckpt_root, hist_path, chash = ctx.out / CHECKPOINT_DIR, ctx.out / "history.jsonl", config_hash(cfg, "train")
    step, history, resumed = 0, [], None
    if lead:  # rank 0 chooses; every rank loads what it chose
        ckpts = set_aside_foreign(ctx, ckpt_root, chash)
        resumed = ckpts[-1] if ctx.resume and ckpts else None
        if resumed is None:
            if ctx.resume:
                ctx.log("--resume: no checkpoint found, starting from scratch")
            shutil.rmtree(ckpt_root, ignore_errors=True)
    resumed = distributed.from_rank0(resumed)
    if resumed:
        state = load_checkpoint(resumed[1], model, optimizer, scheduler, chash)
        step, history = state["step"], _read_history(hist_path, state["step"]) if lead else []
        ctx.log(f"resumed from {resumed[1]} (step {step}/{total}, written by {state.get('world_size', 1)} "
                f"process(es), now {distributed.world_size()}: the same global batch and data order)")
    if lead:
        hist_path.write_text("".join(json.dumps(r) + "\n" for r in history))

    def record(row: dict) -> None:
        history.append(row)
        if lead:
            with hist_path.open("a") as f:
                f.write(json.dumps(row) + "\n")

    def run_eval(at: int) -> None:  # rank 0 only; the others wait for it in their next collective
        if len(dev_ds) == 0 or not lead:
            return
        t = time.time()
        r = evaluate(model, processor, dev_ds, tc.per_device_batch_size, device, amp_dtype,
                     cfg.model.language, cfg.model.task)
        record({"step": at, "dev_loss": r["dev_loss"], "dev_wer": r["dev_wer"], "seconds": round(time.time() - t, 2)})
        ctx.log(f"step {at}: dev loss {r['dev_loss']:.4f}, dev WER {r['dev_wer']} %, e.g. {r['examples'][:1]}")

    if not any("dev_wer" in r for r in history):
        run_eval(0)
    rows = Rows(train_ds, processor.feature_extractor, label_len=label_length(train_ds, model.config.max_target_positions))
    micro_per_step = tc.grad_accum  # of the global batch; this rank takes trainer.accum of them
    stream = iter(loader(rows, (batches.indices(m) for m in distributed.rank_micro_batches(step, total, micro_per_step)),
                          tc.num_workers, device.type == "cuda"))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train_seconds, samples, last_loss, ckpt_io = 0.0, 0, None, []
    while step < total:
        try:
            r = trainer.step(next(stream) for _ in range(trainer.accum))
        except StepError as e:
            raise StepError(f"step {step + 1}: {e}") from None
        step += 1
        last_loss, train_seconds, samples = r["loss"], train_seconds + r["seconds"], samples + r["samples"]
        record({"step": step, "loss": last_loss, "lr": r["lr"], "grad_norm": r["grad_norm"],
                "seconds": round(r["seconds"], 3)})
        ctx.progress(step, total, loss=round(last_loss, 5), lr=r["lr"], **trainer.speed())
        if step % tc.eval_every == 0 or step == total:
            run_eval(step)
        if step % save_every == 0 and step < total:
            t = time.perf_counter()
            path = save_checkpoint(ckpt_root, step, model, optimizer, scheduler, step * micro_per_step, chash)
            if path:
                ckpt_io.append((time.perf_counter() - t, tree_bytes(path)))

    distributed.finish()
    if lead:
        ctx.add_output(save_final(ctx.out / "model", model, processor))
        ctx.add_output(hist_path)

    evals = [r for r in history if "dev_wer" in r]
    train_rows = [r for r in history if "loss" in r]
    speed = trainer.speed()
    flops = flops_per_sample(model.config, rows.label_len, train_encoder=not tc.freeze_encoder)["train_flops"]
    return {
        "optimizer_steps": step,
        "total_steps": total,
        # steady state: every step of this process after its first (compilation happens in the first)
        "samples_per_s": speed["samples_per_s"],
        "seconds_per_step": speed["seconds_per_step"],
        "first_step_s": speed["first_step_s"],
        "samples_per_s_overall": round(samples / train_seconds, 3) if train_seconds else None,
        "compiled": trainer.compiled,
        "optimizer": tc.optimizer,
        "train_flops_per_sample": flops,
        "model_tflops_per_s": round(flops * speed["samples_per_s"] / 1e12, 3) if speed["samples_per_s"] else None,
        "label_tokens": rows.label_len,
        "checkpoint_bytes": ckpt_io[-1][1] if ckpt_io else None,
        "checkpoint_save_s": round(max(t for t, _ in ckpt_io), 3) if ckpt_io else None,
        "train_loss": train_rows[-1]["loss"] if train_rows else last_loss,
        "dev_loss_first": evals[0]["dev_loss"] if evals else None,
        "dev_loss": evals[-1]["dev_loss"] if evals else None,
        "dev_wer_first": evals[0]["dev_wer"] if evals else None,
        "dev_wer": evals[-1]["dev_wer"] if evals else None,
        "fake_quant_modules": trainer.fake_quant_modules,
        "quant_scheme": cfg.quant.scheme,
        "peak_memory_mb": round(_peak_memory_mb(device), 1),
        "precision": precision,
        "device": str(device),
        "trainable_params": sum(p.numel() for p in trainer.trainable),
        "freeze_encoder": tc.freeze_encoder,
        "resumed_from_step": resumed[0] if resumed else None,
        "world_size": distributed.world_size(),
    }


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
