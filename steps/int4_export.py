"""The int4 writer: one ONNX graph -> MatMulNBits blocks, the vocabulary matrix at spec.vocab_bits.

Block Linears: MatMulNBits, 4-bit symmetric blocks of spec.group_size along the input dimension, at
spec.accuracy_level (0: float activations, what QAT trains). The vocabulary (the MatMul producing
the logits, tied to the token embedding) follows spec.vocab_layout (contract/quant_spec.py):
"int8_dynamic" quantizes it as the int8 scheme does (per-channel int8 weights, uint8 activations per
call: DynamicQuantizeMatMul at run time; steps/int8_export.py) and the embedding reads its int8 rows; "nbits" makes it a
4-bit MatMulNBits whose blocks the embedding reads through GatherBlockQuantized.
"""
from __future__ import annotations

import logging
from pathlib import Path

import onnx

from contract.quant_spec import QuantSpec

from .common import StepError
from .int8_export import int8_nodes
from .tied_embedding import load_folded, share_tied_embedding_int8, share_tied_embedding_nbits


def _nbits(model: onnx.ModelProto, spec: QuantSpec, bits: int, accuracy_level: int, **nodes) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
    from onnxruntime.quantization.quant_utils import QuantFormat

    config = DefaultWeightOnlyQuantConfig(block_size=spec.group_size, is_symmetric=spec.symmetric,
                                          accuracy_level=accuracy_level, quant_format=QuantFormat.QOperator,
                                          op_types_to_quantize=("MatMul",), quant_axes=(("MatMul", 0),), bits=bits)
    quantizer = MatMulNBitsQuantizer(model, algo_config=config, **nodes)
    quantizer.process()
    return quantizer.model.model


def quantize_int4(src: Path, dst: Path, spec: QuantSpec, accuracy_level: int | None = None) -> bool:
    """Write src as int4 into dst (external data). Returns whether the tied token embedding reads the
    quantized vocabulary matrix. accuracy_level overrides spec.accuracy_level (benchmarks only)."""
    from onnxruntime.quantization.onnx_model import ONNXModel

    level = spec.accuracy_level if accuracy_level is None else accuracy_level
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    model = load_folded(src)
    vocab = [n.name for n in model.graph.node if n.op_type == "MatMul" and "logits" in n.output]
    if vocab and not vocab[0]:
        raise StepError(f"{src}: the MatMul producing the logits has no name; the int4 export cannot select it")
    if vocab and spec.vocab_layout == "int8_dynamic":
        model = _nbits(int8_nodes(model, vocab), spec, spec.bits, level)
        shared = share_tied_embedding_int8(model)
    else:  # "nbits": the vocabulary in 4-bit blocks like the rest
        model = _nbits(model, spec, spec.bits, level)
        shared = share_tied_embedding_nbits(model)
    ONNXModel(model).save_model_to_file(str(dst), use_external_data_format=True)
    return shared
