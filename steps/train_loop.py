"""The training core that the train step and the speed benchmarks share: one code path.

    trainer = Trainer(model, Recipe.of(cfg), total_steps=...)   # QAT, checkpointing, compile, optimizer
    row = trainer.step(micro_batches)                             # one optimizer step

steps/train.py adds the data, evaluation and checkpoints around it; benchmarks/gpu_probe.py and
benchmarks/train_speed.py drive the same Trainer on synthetic batches. Nothing here imports
pydantic, datasets or Prefect: the GPU probe runs it with only torch and transformers installed.

Compilation (`Recipe.compile`, unset: on with CUDA): each encoder and decoder block is compiled
on its own (`nn.Module.compile`, static shapes). Whisper's layer loop draws a random number per
layer for LayerDrop and branches on it (a graph break), so a whole-model compile would break
there every layer; the blocks hold ~98 % of the FLOPs (see `flops_per_sample`) and hold no break
(tests/test_train_loop.py checks with torch._dynamo.explain). Static shapes make a compiled
kernel depend only on the batch shape, never on which shapes came before: that keeps a resumed
run equal to an uninterrupted one. Labels are therefore padded to one length per run.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch

from . import distributed, fake_quant
from .errors import StepError


@dataclass(frozen=True)
class Recipe:
    """How a model is trained: the train and quant config sections' fields that the core reads."""

    scheme: Optional[str] = None  # "int8" / "int4" QAT, None: plain fine-tuning
    group_size: int = 32
    vocab_bits: int = 8  # int4: bits of proj_out and the tied embedding (quant.vocab_bits)
    gradient_checkpointing: bool = True
    compile: Optional[bool] = None  # None: on with CUDA, off on CPU
    precision: str = "auto"
    optimizer: str = "adamw"
    learning_rate: float = 5e-6
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    grad_accum: int = 1
    freeze_encoder: bool = False
    warmup_steps: int = 0

    @classmethod
    def of(cls, cfg) -> "Recipe":
        """From a run config (contract.config.RunConfig): its train and quant sections."""
        tc = cfg.train
        return cls(scheme=cfg.quant.scheme, group_size=cfg.quant.group_size, vocab_bits=cfg.quant.vocab_bits,
                   gradient_checkpointing=tc.gradient_checkpointing, compile=tc.compile, precision=tc.precision,
                   optimizer=tc.optimizer, learning_rate=tc.learning_rate, weight_decay=tc.weight_decay,
                   max_grad_norm=tc.max_grad_norm, grad_accum=tc.grad_accum, freeze_encoder=tc.freeze_encoder,
                   warmup_steps=tc.warmup_steps)


# ---------------------------------------------------------------- device, precision, optimizer

def device_precision(precision: str) -> tuple[torch.device, torch.dtype | None, str]:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if precision == "auto":
        precision = "bf16" if cuda else "fp32"
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise StepError("train.precision bf16 needs a GPU with bfloat16 support (Ampere or newer); use fp32")
    return device, (torch.bfloat16 if precision == "bf16" else None), precision


def autocast(device, amp_dtype):
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on biases and norm weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name.endswith(".bias") or "norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Multiplier of the peak learning rate for 0-based optimizer step `step`: linear warm-up, cosine decay."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: torch.nn.Module, recipe: Recipe, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, recipe.weight_decay)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=recipe.learning_rate, fused=device.type == "cuda")
    if recipe.optimizer == "adamw8bit":
        try:
            from torchao.optim import AdamW8bit
        except ImportError as e:
            raise StepError(f"train.optimizer adamw8bit needs torchao ({e}); install requirements-remote.txt "
                            "(it pins torchao) or set train.optimizer: adamw") from None
        return AdamW8bit(groups, lr=recipe.learning_rate)
    raise StepError(f"train.optimizer must be 'adamw' or 'adamw8bit', got {recipe.optimizer!r}")


def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The encoder and decoder blocks: what is compiled."""
    return [*model.model.encoder.layers, *model.model.decoder.layers]


def compile_wanted(recipe: Recipe, device: torch.device) -> bool:
    return device.type == "cuda" if recipe.compile is None else recipe.compile


def prepare_model(model: torch.nn.Module, recipe: Recipe, device: torch.device) -> tuple[int, bool]:
    """Freeze, fake-quantize, checkpoint and compile `model` for training on `device`, in that order.
    Returns (fake-quantized Linears, compiled)."""
    if recipe.freeze_encoder:
        model.model.encoder.requires_grad_(False)
    n_fq = fake_quant.prepare(model, recipe) if recipe.scheme else 0
    if recipe.gradient_checkpointing:
        # non-reentrant: works with compiled blocks and with inputs that need no grad
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.to(device).train()
    compiled = compile_wanted(recipe, device)
    if compiled:
        for block in blocks(model):
            block.compile(dynamic=False)
    return n_fq, compiled


def eager():
    """Run compiled modules eagerly inside this block (evaluation, generation: shapes change per token)."""
    return torch.compiler.set_stance("force_eager")


# ---------------------------------------------------------------- FLOPs

def flops_per_sample(config, label_tokens: int, train_encoder: bool = True) -> dict:
    """Model FLOPs of one training sample (docs/REFERENCE.md, "Training FLOPs"): 2 per multiply-add
    of every matmul and convolution in the forward pass (encoder over max_source_positions frames,
    decoder over `label_tokens`), times 3 for forward + backward (backward: gradients of inputs and
    of weights, 2x forward); a frozen encoder counts its forward only. Checkpointing's recomputed
    forward is not counted (model FLOPs, not hardware FLOPs: MFU as PaLM defines it).
    Norms, softmax, activations and the fake quantizers' elementwise work are left out (<1 %)."""
    d, T, L = config.d_model, config.max_source_positions, label_tokens
    mel, V = config.num_mel_bins, config.vocab_size
    conv = 2 * T * mel * d * 3 + T * d * d * 3  # conv1 over 2T frames, conv2 stride 2 over T
    enc_layer = 4 * d * d * T + 2 * T * T * d + 2 * d * config.encoder_ffn_dim * T
    dec_layer = (4 * d * d * L + 2 * L * L * d  # self-attention
                 + 2 * d * d * L + 2 * d * d * T + 2 * L * T * d  # cross-attention (k, v over the encoder states)
                 + 2 * d * config.decoder_ffn_dim * L)
    enc_fwd = 2 * (conv + config.encoder_layers * enc_layer)
    dec_fwd = 2 * (config.decoder_layers * dec_layer + d * V * L)  # + the output projection
    total = (3 if train_encoder else 1) * enc_fwd + 3 * dec_fwd
    return {"train_flops": float(total), "encoder_share": round((3 if train_encoder else 1) * enc_fwd / total, 4)}


# ---------------------------------------------------------------- the optimizer step

class Trainer:
    """A prepared model, its optimizer and LR schedule, and one optimizer step at a time.

    Times every step; the first step of the process (compilation happens there) is kept apart
    from the steady-state figures."""

    def __init__(self, model: torch.nn.Module, recipe: Recipe, total_steps: int = 1,
                 encode: Optional[Callable[[list, torch.Tensor], torch.Tensor]] = None):
        self.model, self.recipe = model, recipe
        self.device, self.amp_dtype, self.precision = device_precision(recipe.precision)
        self.fake_quant_modules, self.compiled = prepare_model(model, recipe, self.device)
        ranks = distributed.world_size()
        if recipe.grad_accum % ranks:
            raise StepError(f"train.grad_accum {recipe.grad_accum} is not a multiple of the {ranks} training "
                            f"processes; set it to a multiple of {ranks}")
        self.accum = recipe.grad_accum // ranks  # micro-batches per process and optimizer step
        self.net = distributed.wrap(model, self.device)  # DDP around the prepared model when N > 1
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(model, recipe, self.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, recipe.warmup_steps, total_steps))
        self.encode = encode  # rows, features -> encoder states (a cache), or None: the encoder runs
        self.first_step_s: Optional[float] = None
        self.steady_s, self.steady_samples, self.steady_steps = 0.0, 0, 0

    def _loss(self, batch: dict) -> torch.Tensor:
        feats = batch["input_features"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        with autocast(self.device, self.amp_dtype):
            if self.encode is not None:
                return self.net(encoder_outputs=(self.encode(batch["rows"], feats),), labels=labels).loss
            return self.net(input_features=feats, labels=labels).loss

    def step(self, micro_batches: Iterable[dict]) -> dict:
        """Forward and backward over this process's `self.accum` micro-batches, clip, optimizer and schedule
        step. With N processes, DDP averages the gradients on the last micro-batch only (no_sync before);
        the loss and sample count returned are the whole global batch's."""
        t0 = time.perf_counter()
        accum = self.accum
        loss_sum, samples = 0.0, 0
        for i, batch in enumerate(micro_batches):
            with self.net.no_sync() if self.net is not self.model and i < accum - 1 else contextlib.nullcontext():
                loss = self._loss(batch)
                (loss / accum).backward()
            loss_sum += float(loss.detach())
            samples += len(batch["labels"])
        loss_sum, samples = distributed.sum_over_ranks(loss_sum, samples)
        samples = int(samples)
        loss = loss_sum / self.recipe.grad_accum
        if not math.isfinite(loss):
            raise StepError(f"training diverged: loss {loss}; lower train.learning_rate")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, self.recipe.max_grad_norm))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if self.first_step_s is None:
            self.first_step_s = dt
        else:
            self.steady_s, self.steady_samples, self.steady_steps = (
                self.steady_s + dt, self.steady_samples + samples, self.steady_steps + 1)
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "seconds": dt, "samples": samples}

    def speed(self) -> dict:
        """First step (compilation included) apart from the steady state (every later step)."""
        s = self.steady_s
        return {"first_step_s": None if self.first_step_s is None else round(self.first_step_s, 3),
                "samples_per_s": round(self.steady_samples / s, 3) if s else None,
                "seconds_per_step": round(s / self.steady_steps, 4) if self.steady_steps else None,
                "steady_steps": self.steady_steps, "compiled": self.compiled}
