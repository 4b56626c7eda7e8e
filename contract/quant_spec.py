"""The quantization recipe, one object: the grid QAT simulates and the export writes.

steps/fake_quant.py (what training sees), steps/convert.py and steps/int4_export.py (what ships),
steps/train_loop.py's Recipe, the model card and benchmarks/int4_recipe.py all read a QuantSpec
derived from the config's quant section; none of them holds a grid constant of its own.

- Block Linears (the encoder's and decoder's attention and MLP projections):
  int8: ORT dynamic quantization, weights per output channel (symmetric, max|w|/127), activations
  uint8 per call (DynamicQuantizeLinear: per utterance in the encoder, per token in the decoder).
  int4, encoder (`encoder_layout` "int4_int8_kernel"): 4-bit codes in blocks of `group_size` inputs,
  each block's scale an integer multiple (1..16) of its output channel's scale (max|w|/112), so code x
  multiple is an int8 weight in [-128, 112]. The file holds the codes as ONNX INT4 (two per byte) and
  one int8 multiple per block; ONNX Runtime multiplies them out once, when the session loads (constant
  folding), and runs the int8 scheme's kernel with uint8 activations per utterance. At 1500 frames no
  4-bit kernel comes near int8's (benchmarks/int4_profile.json); this one does and the file stays
  4-bit. ("nbits", `quant.encoder_layout`: MatMulNBits at `encoder_accuracy_level` 0, float
  activations: slower on the CPU, but MatMulNBits has a CUDA kernel, so it is the layout to serve on a
  GPU, where int8's DynamicQuantizeMatMul falls back to the CPU.)
  int4, decoder: ORT MatMulNBits, symmetric blocks of `group_size` inputs (the element of largest
  magnitude maps to -8). They run once per generated token, at `decoder_accuracy_level` 4: MLAS
  quantizes each token's activations to int8 in blocks of `group_size` (symmetric, scale max|x|/127,
  rounding half to even) and multiplies integers, faster than int8's kernel at one row
  (benchmarks/int4_profile.json); QAT fake-quantizes those activations on the same grid. The
  decoder's cross-attention key/value projections (`cross_kv_layout`) read all
  1500 encoder frames once per clip, an encoder-like load: they take the int8 scheme's layout (weights
  per channel, uint8 activations per call), as the int8 scheme trains and ships them.
- Vocabulary matrix (proj_out and the tied token embedding, one matrix):
  8 bits ("int8_dynamic"): the int8 scheme's layout in both schemes: per-channel int8 weights and
  uint8 activations per token (DynamicQuantizeMatMul, a fast CPU kernel; MatMulNBits at 8 bits and
  accuracy_level 0 has none), the embedding reading the same int8 rows.
  4 bits ("nbits", int4 only): MatMulNBits 4-bit blocks at the decoder's accuracy level (it runs once
  per token), the embedding a GatherBlockQuantized of the same blocks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .catalogue import SCHEMES, Scheme

Layout = Literal["int8_dynamic", "nbits", "int4_int8_kernel"]
# int4's encoder: "int4_int8_kernel" for CPU serving (int8's kernel, the default), "nbits" for GPU serving
# (MatMulNBits has a CUDA kernel; DynamicQuantizeMatMul runs on the CPU under the CUDA EP)
ENCODER_LAYOUTS = ("int4_int8_kernel", "nbits")


@dataclass(frozen=True)
class QuantSpec:
    scheme: Scheme
    bits: int  # weight bits of the block Linears
    group_size: int  # int4: inputs per weight block
    vocab_bits: int  # proj_out and the tied embedding
    vocab_layout: Layout
    symmetric: bool = True  # weights: zero point fixed (mid-range), as ORT's quantizers write them
    block_axis: int = 1  # int4 blocks run along nn.Linear's input dimension (weight [out, in])
    encoder_layout: Layout = "int4_int8_kernel"  # int4's encoder block Linears
    encoder_accuracy_level: int = 0  # encoder_layout "nbits" only: 0 = float activations
    decoder_accuracy_level: int = 4  # 4 = int8 activations in blocks of group_size (QAT simulates them)
    cross_kv_layout: Layout = "int8_dynamic"  # the decoder's cross-attention k/v projections (int4)

    @classmethod
    def of(cls, scheme: Scheme, group_size: int = 32, vocab_bits: int = 8,
           encoder_layout: Layout = "int4_int8_kernel") -> "QuantSpec":
        if scheme not in SCHEMES:
            raise ValueError(f"quant.scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
        if vocab_bits not in (4, 8) or (scheme == "int8" and vocab_bits != 8):
            raise ValueError(f"quant.vocab_bits {vocab_bits!r}: 8, or 4 with quant.scheme int4")
        if encoder_layout not in ENCODER_LAYOUTS or (scheme == "int8" and encoder_layout != "int4_int8_kernel"):
            raise ValueError(f"quant.encoder_layout {encoder_layout!r}: one of {', '.join(ENCODER_LAYOUTS)} "
                             "(int4 only; int8's encoder is always the int8 layout)")
        return cls(scheme=scheme, bits=8 if scheme == "int8" else 4, group_size=group_size, vocab_bits=vocab_bits,
                   vocab_layout="int8_dynamic" if vocab_bits == 8 else "nbits", encoder_layout=encoder_layout)

    def int8_activation_blocks(self, decoder: bool) -> bool:
        """Whether MatMulNBits in the decoder (or the encoder) rounds activations to int8 blocks (accuracy_level 4)."""
        if not decoder and self.encoder_layout != "nbits":
            return False
        return (self.decoder_accuracy_level if decoder else self.encoder_accuracy_level) == 4

    def describe(self) -> str:
        """One line for the model card and reports."""
        vocab = ("int8 per output channel with uint8 activations per token"
                 if self.vocab_layout == "int8_dynamic" else f"{self.vocab_bits}-bit blocks of {self.group_size}")
        if self.scheme == "int8":
            return ("int8 weights per output channel, symmetric, with dynamic uint8 activations: the grid of "
                    "ONNX Runtime's quantize_dynamic; vocabulary the same")
        encoder = (f"int4 weights, symmetric, in blocks of {self.group_size} inputs, each block's scale an integer multiple "
                   "(1 to 16) of its output channel's, stored packed and run as int8 with dynamic uint8 activations"
                   if self.encoder_layout == "int4_int8_kernel" else
                   f"MatMulNBits blocks of {self.group_size} at accuracy_level {self.encoder_accuracy_level}")
        return (f"encoder: {encoder}; decoder: int4 weights, symmetric, in blocks of {self.group_size} inputs (the grid "
                f"of ONNX Runtime's MatMulNBits) with int8 activations in blocks of {self.group_size} "
                f"(accuracy_level {self.decoder_accuracy_level}); the decoder's cross-attention key/value "
                f"projections int8 per output channel with uint8 activations per clip; the vocabulary matrix "
                f"(output projection and tied token embedding) {vocab}")


def quant_spec(quant) -> QuantSpec:
    """From a config's quant section (contract.config.QuantConfig)."""
    return QuantSpec.of(quant.scheme, quant.group_size, quant.vocab_bits, quant.encoder_layout)
