"""Quantization-aware training: fake-quantize Whisper's block Linears on ONNX Runtime's grid.

Two steps, like torchao's prepare/convert:

    n = prepare(model, spec)    # encoder/decoder block Linears -> FakeQuantLinear (same Parameters)
    ... train ...
    model = convert(model)      # FakeQuantLinear -> nn.Linear holding the trained float weights

`spec` is the run's contract.quant_spec.QuantSpec, which the export reads too. Why not torchao's
QATConfig as is: the export (steps/convert) quantizes with ONNX Runtime, whose grids differ from
torchao's recipes (docs/REFERENCE.md section 3):

* int8 = ORT `quantize_dynamic`: weights per output channel, symmetric, scale max|w|/127
  (torchao: /127.5); activations `DynamicQuantizeLinear`: one asymmetric uint8 range per tensor,
  widened to include 0 (torchao: per token). The range follows what one ORT call sees at
  inference: the encoder runs once per utterance (one range per utterance, as do the decoder's
  cross-attention k/v projections of the encoder states); the decoder generates one token per
  call with its KV cache, so its other Linears get one range per token.
* int4, encoder: 4-bit codes in blocks of `group_size` inputs whose scale is an integer multiple
  m in 1..16 of the output channel's scale s = max|w|/112 (per block the m, at most two below the
  smallest that clips nothing, with the least squared error), codes round(w / (m s)) half to even,
  in [-8, 7]; code x m is the int8 weight ORT multiplies
  (steps/int4_export.py writes the codes and multiples, the session folds them into int8), with the
  int8 scheme's uint8 activations, one range per utterance.
* int4, decoder = ORT `MatMulNBits` (symmetric, blocks of `group_size` along the input dimension): the
  element of largest magnitude m in a block maps to -8 with scale m / -8, the rest round into
  [-8, 7] (torchao: max|w|/7.5, symmetric). Its activations are int8 in blocks of `group_size` per token (accuracy_level 4: MLAS's
  QuantizeARow_CompInt8, scale max|x|/127, x * (127 / max|x|) rounded half to even). The decoder's
  cross-attention k/v projections are the int8 scheme's (spec.cross_kv_layout). The vocabulary
  matrix (proj_out and the tied token embedding) is int8 exactly as in the int8 scheme (per-channel
  weights, activations per token) unless quant.vocab_bits is 4 (4-bit blocks like the decoder's):
  spec.vocab_layout.

tests/test_fake_quant.py checks these grids bit for bit against what ORT itself produces, and
benchmarks/train_speed.py measures how far torchao's grids are from ORT's on the real weights.
Gradients pass straight through (STE, clipping included); scales are not learned.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

# plain-Python modules only (not .common): the GPU probe runs this without pydantic
from contract.catalogue import SCHEMES

from .errors import StepError

if TYPE_CHECKING:
    from contract.quant_spec import QuantSpec


class _StraightThrough(torch.autograd.Function):
    """y = quantize(x) forward, dy/dx = 1 backward; saves no tensors (no activation memory cost)."""

    @staticmethod
    def forward(ctx, x, quantize):
        return quantize(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _int8_weight(w: torch.Tensor) -> torch.Tensor:
    wf = w.float()
    scale = (wf.abs().amax(dim=1, keepdim=True) / 127.0).clamp_min(1e-12)
    return (torch.clamp(torch.round(wf / scale), -127, 127) * scale).to(w.dtype)


def _block_weight(w: torch.Tensor, group_size: int, bits: int) -> torch.Tensor:
    out_f, in_f = w.shape
    zero = 2 ** (bits - 1)
    wf = F.pad(w.float(), (0, (-in_f) % group_size)).view(out_f, -1, group_size)
    scale = torch.gather(wf, -1, wf.abs().argmax(dim=-1, keepdim=True)) / -zero
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    # MLAS (MlasQuantizeBlockwise) rounds w * (1 / scale) + zero half away from zero (std::roundf):
    # an exact tie such as -3.5 becomes -3, where torch.round's half-to-even gives -4
    v = wf * (1.0 / scale) + zero
    q = torch.clamp(torch.where(v - torch.floor(v) == 0.5, torch.ceil(v), torch.round(v)), 0, 2 * zero - 1) - zero
    return (q * scale).view(out_f, -1)[:, :in_f].to(w.dtype)


INT8_KERNEL_MULTIPLES = 16  # block scale multiples: 7 x 16 = 112 <= 127, the int8 weight's range


def int4_int8_kernel_codes(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The encoder's int4 grid for weight [out, in] (in a multiple of group_size): codes [out, in] in
    [-8, 7], block multiples [out, in / group_size] in 1..16, channel scales [out]; the weight is
    codes x multiples x scale, so code x multiple is an int8 weight in [-128, 112]. The channel scale is
    max|w| / 112; each block takes, of the three multiples at and below ceil(16 max|w_block| / max|w|)
    (the smallest that clips nothing), the one whose codes give the smallest squared error (clipping
    the block's extreme can pay for a finer step: 24 % less squared error than the ceiling alone on
    whisper-base's encoder). The export writes these very tensors (steps/int4_export.py)."""
    out_f, in_f = w.shape
    if in_f % group_size:
        raise StepError(f"int4 encoder grid: {in_f} inputs are not a multiple of group_size {group_size}")
    wf = w.detach().float().view(out_f, -1, group_size)
    channel_max = wf.abs().amax(dim=(1, 2), keepdim=True)
    scale = torch.where(channel_max == 0, torch.ones_like(channel_max), channel_max / (7 * INT8_KERNEL_MULTIPLES))
    ceiling = torch.clamp(torch.ceil(wf.abs().amax(dim=-1, keepdim=True) / (7 * scale)), 1, INT8_KERNEL_MULTIPLES)
    best = None
    for lower in (0, 1, 2):  # ties keep the larger multiple
        multiples = torch.clamp(ceiling - lower, 1, INT8_KERNEL_MULTIPLES)
        codes = torch.clamp(torch.round(wf / (multiples * scale)), -8, 7)
        error = (codes * multiples * scale - wf).square().sum(dim=-1, keepdim=True)
        if best is None:
            best = [codes, multiples, error]
        else:
            better = error < best[2]
            best = [torch.where(better, codes, best[0]), torch.where(better, multiples, best[1]),
                    torch.where(better, error, best[2])]
    codes, multiples = best[0], best[1]
    return codes.view(out_f, in_f), multiples.view(out_f, -1), scale.view(out_f)


def _int4_int8_kernel_weight(w: torch.Tensor, group_size: int) -> torch.Tensor:
    codes, multiples, scale = int4_int8_kernel_codes(w, group_size)
    int8 = codes.view(w.shape[0], -1, group_size) * multiples.unsqueeze(-1)
    return (int8.view(w.shape) * scale[:, None]).to(w.dtype)


def _uint8_activation(x: torch.Tensor, per_token: bool = False) -> torch.Tensor:
    xf = x.float()
    first = xf.dim() - 1 if per_token or xf.dim() == 1 else 1  # range over dims first.. (dim 0 = batch)
    dims = tuple(range(first, xf.dim()))
    lo = xf.amin(dim=dims, keepdim=True).clamp(max=0)
    hi = xf.amax(dim=dims, keepdim=True).clamp(min=0)
    scale = (hi - lo) / 255.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zp = torch.clamp(torch.round(-lo / scale), 0, 255)
    return ((torch.clamp(torch.round(xf / scale) + zp, 0, 255) - zp) * scale).to(x.dtype)


def _int8_block_activation(x: torch.Tensor, group_size: int) -> torch.Tensor:
    xf = x.float()
    k = xf.shape[-1]
    blocks = F.pad(xf, (0, (-k) % group_size)).unflatten(-1, (-1, group_size))
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    inverse = torch.where(amax == 0, torch.zeros_like(amax), 127.0 / amax)
    q = torch.round(blocks * inverse)  # half to even, as _mm512_roundscale_ps(_MM_ROUND_NEAREST)
    return (q * (amax / 127.0)).flatten(-2)[..., :k].to(x.dtype)


def fake_quant_weight_int8(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric int8, scale max|w|/127 (ORT quantize_dynamic, QInt8 weights)."""
    return _StraightThrough.apply(w, _int8_weight)


def fake_quant_weight_blocks(w: torch.Tensor, group_size: int, bits: int = 4) -> torch.Tensor:
    """ORT MatMulNBits symmetric weights: per block, scale = (signed max-magnitude value) / -2^(bits-1)."""
    return _StraightThrough.apply(w, lambda t: _block_weight(t, group_size, bits))


def fake_quant_weight_int4_int8_kernel(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """The encoder's int4: 4-bit codes x integer block multiples x channel scale (int4_int8_kernel_codes)."""
    return _StraightThrough.apply(w, lambda t: _int4_int8_kernel_weight(t, group_size))


def fake_quant_act_uint8(x: torch.Tensor, per_token: bool = False) -> torch.Tensor:
    """ORT DynamicQuantizeLinear: asymmetric uint8, range includes 0, one range per batch element
    (or per token: per vector along the last dimension)."""
    return _StraightThrough.apply(x, lambda t: _uint8_activation(t, per_token))


def fake_quant_act_int8_blocks(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """MatMulNBits at accuracy_level 4: symmetric int8 per block of group_size along the last dimension."""
    return _StraightThrough.apply(x, lambda t: _int8_block_activation(t, group_size))


class FakeQuantLinear(nn.Linear):
    """nn.Linear that trains through ORT's int8 (W8A8 dynamic) or int4 (blocks of `bits`) rounding;
    int4 with int8_activations: MatMulNBits at accuracy_level 4 (activations int8 in the same blocks);
    int4 with int8_kernel: the encoder's 4-bit codes run as int8 (uint8 activations as int8's)."""

    def __init__(self, linear: nn.Linear, scheme: str, group_size: int = 32, per_token: bool = False, bits: int = 4,
                 int8_activations: bool = False, int8_kernel: bool = False):
        if scheme not in SCHEMES:
            raise StepError(f"quant.scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # the same Parameters: nothing copied
        self.scheme, self.group_size, self.per_token, self.bits = scheme, group_size, per_token, bits
        self.int8_activations = int8_activations and scheme == "int4"
        self.int8_kernel = int8_kernel and scheme == "int4"
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return F.linear(x, self.weight, self.bias)
        if self.scheme == "int8":
            return F.linear(fake_quant_act_uint8(x, self.per_token), fake_quant_weight_int8(self.weight), self.bias)
        if self.int8_kernel:
            return F.linear(fake_quant_act_uint8(x, self.per_token),
                            fake_quant_weight_int4_int8_kernel(self.weight, self.group_size), self.bias)
        if self.int8_activations:
            x = fake_quant_act_int8_blocks(x, self.group_size)
        return F.linear(x, fake_quant_weight_blocks(self.weight, self.group_size, self.bits), self.bias)

    def to_linear(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        lin.weight, lin.bias = self.weight, self.bias
        return lin

    def extra_repr(self) -> str:
        extra = (f", bits={self.bits}, group_size={self.group_size}, int8_activations={self.int8_activations}, "
                 f"int8_kernel={self.int8_kernel}"
                 if self.scheme == "int4" else f", per_token={self.per_token}")
        return super().extra_repr() + f", scheme={self.scheme}{extra}"


def _blocks(model: nn.Module) -> list[nn.Module]:
    try:
        return [model.model.encoder.layers, model.model.decoder.layers]
    except AttributeError:
        raise StepError(f"QAT expects a Whisper seq2seq model (model.model.encoder/decoder.layers); "
                        f"got {type(model).__name__}") from None


def prepare(model: nn.Module, spec: QuantSpec) -> int:
    """Swap the Linears of the encoder and decoder blocks for FakeQuantLinear; return how many."""
    if count_fake_quant(model):
        raise StepError("QAT prepare: the model is already prepared (it holds FakeQuantLinear layers)")
    n = 0
    encoder_layers, decoder_layers = _blocks(model)
    for layers in (encoder_layers, decoder_layers):
        decoder = layers is decoder_layers
        for parent_name, parent in layers.named_modules():
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    # the cross-attention k/v read the encoder states: one range per clip, not per token
                    cross_kv = decoder and parent_name.endswith("encoder_attn") and name in ("k_proj", "v_proj")
                    scheme = "int8" if cross_kv and spec.cross_kv_layout == "int8_dynamic" else spec.scheme
                    int8_kernel = not decoder and spec.encoder_layout == "int4_int8_kernel"
                    setattr(parent, name, FakeQuantLinear(child, scheme, spec.group_size, decoder and not cross_kv,
                                                          spec.bits, int8_activations=spec.int8_activation_blocks(decoder),
                                                          int8_kernel=int8_kernel))
                    n += 1
    if n == 0:
        raise StepError("QAT prepare found no nn.Linear in model.model.encoder/decoder.layers: refusing "
                        "to fall back to plain fine-tuning; check the model architecture")
    return n + _prepare_tied_output(model, spec)


def convert(model: nn.Module) -> nn.Module:
    """Replace every FakeQuantLinear by a plain nn.Linear holding the trained float weights."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FakeQuantLinear):
                setattr(parent, name, child.to_linear())
            elif isinstance(child, FakeQuantEmbedding):
                setattr(parent, name, child.to_embedding())
    return model


def count_fake_quant(model: nn.Module) -> int:
    return sum(isinstance(m, (FakeQuantLinear, FakeQuantEmbedding)) for m in model.modules())


def set_enabled(model: nn.Module, enabled: bool) -> None:
    """Turn fake quantization on or off (e.g. to compare against float) without converting."""
    for m in model.modules():
        if isinstance(m, (FakeQuantLinear, FakeQuantEmbedding)):
            m.enabled = enabled


# --- coverage beyond the blocks: the tied output projection and token embedding ---------------------
# The export quantizes proj_out and, through it, the tied token embedding (steps/convert.py
# share_tied_embedding_int8, steps/int4_export.py share_tied_embedding_nbits): at 8 bits (both
# schemes) proj_out is W8A8 like the int8 decoder's Linears (one activation range per generated
# token) and its embedding rows are the same int8 weights; at 4 bits (int4 only) proj_out is
# MatMulNBits at the decoder's accuracy level and the embedding reads the same blocks
# (GatherBlockQuantized, weights only).
# Training sees exactly that, so what is trained is what ships (tests/test_parity.py).

class FakeQuantEmbedding(nn.Embedding):
    """nn.Embedding whose table is read through the same weight rounding as the tied proj_out."""

    def __init__(self, emb: nn.Embedding, scheme: str, group_size: int = 32, bits: int = 4):
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = emb.num_embeddings, emb.embedding_dim
        self.padding_idx, self.max_norm, self.norm_type = emb.padding_idx, emb.max_norm, emb.norm_type
        self.scale_grad_by_freq, self.sparse = emb.scale_grad_by_freq, emb.sparse
        self.weight = emb.weight  # the same Parameter (tied with proj_out)
        self.scheme, self.group_size, self.bits, self.enabled = scheme, group_size, bits, True

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.enabled:
            w = fake_quant_weight_int8(w) if self.scheme == "int8" else fake_quant_weight_blocks(w, self.group_size, self.bits)
        return F.embedding(ids, w, self.padding_idx)

    def to_embedding(self) -> nn.Embedding:
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx,
                           device=self.weight.device, dtype=self.weight.dtype)
        emb.weight = self.weight
        return emb


def _prepare_tied_output(model: nn.Module, spec: QuantSpec) -> int:
    """Wrap proj_out (and the token embedding when tied to it); returns how many modules were wrapped."""
    proj = getattr(model, "proj_out", None)
    if type(proj) is not nn.Linear:
        return 0
    scheme = "int8" if spec.vocab_layout == "int8_dynamic" else "int4"
    model.proj_out = FakeQuantLinear(proj, scheme, spec.group_size, per_token=True, bits=spec.vocab_bits,
                                     int8_activations=spec.int8_activation_blocks(decoder=True))
    emb = model.model.decoder.embed_tokens
    if type(emb) is nn.Embedding and emb.weight is proj.weight:
        model.model.decoder.embed_tokens = FakeQuantEmbedding(emb, scheme, spec.group_size, spec.vocab_bits)
        return 2
    return 1
