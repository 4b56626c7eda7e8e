"""The int4 writer: one ONNX graph -> MatMulNBits blocks, the vocabulary matrix at spec.vocab_bits.

Block Linears: MatMulNBits, 4-bit symmetric blocks of spec.group_size along the input dimension. The
encoder graph runs them at spec.encoder_accuracy_level (0: float activations), a decoder graph at
spec.decoder_accuracy_level (4: int8 activations in blocks, per token), as QAT trains them
(contract/quant_spec.py). In a decoder graph the MatMuls fed by the encoder states (the
cross-attention keys and values) follow spec.cross_kv_layout: "int8_dynamic" writes them as the int8
scheme does. The vocabulary (the MatMul producing the logits, tied to the token embedding) follows
spec.vocab_layout: "int8_dynamic" quantizes it as the int8 scheme does (per-channel int8 weights,
uint8 activations per call: DynamicQuantizeMatMul at run time; steps/int8_export.py) and the
embedding reads its int8 rows; "nbits" makes it a 4-bit MatMulNBits whose blocks the embedding reads
through GatherBlockQuantized.
"""
from __future__ import annotations

import logging
from pathlib import Path

import onnx

from contract.quant_spec import QuantSpec

from .common import StepError
from .int8_export import int8_nodes
from .tied_embedding import load_folded, share_tied_embedding_int8, share_tied_embedding_nbits


def _nbits(model: onnx.ModelProto, spec: QuantSpec, bits: int, accuracy_level: int) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
    from onnxruntime.quantization.quant_utils import QuantFormat

    config = DefaultWeightOnlyQuantConfig(block_size=spec.group_size, is_symmetric=spec.symmetric,
                                          accuracy_level=accuracy_level, quant_format=QuantFormat.QOperator,
                                          op_types_to_quantize=("MatMul",), quant_axes=(("MatMul", 0),), bits=bits)
    quantizer = MatMulNBitsQuantizer(model, algo_config=config)
    quantizer.process()
    return quantizer.model.model


ENCODER_STATES = "encoder_hidden_states"  # the decoder graph's input the cross-attention keys/values read


def quantize_int4(src: Path, dst: Path, spec: QuantSpec, part: str, accuracy_level: int | None = None) -> bool:
    """Write src, the "encoder" or a "decoder" graph, as int4 into dst (external data). Returns whether the
    tied token embedding reads the quantized vocabulary matrix. accuracy_level overrides the spec's level
    for every MatMulNBits (benchmarks only)."""
    from onnxruntime.quantization.onnx_model import ONNXModel

    if part not in ("encoder", "decoder"):
        raise ValueError(f"part must be 'encoder' or 'decoder', got {part!r}")
    level = spec.encoder_accuracy_level if part == "encoder" else spec.decoder_accuracy_level
    level = level if accuracy_level is None else accuracy_level
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    model = load_folded(src)
    vocab = [n.name for n in model.graph.node if n.op_type == "MatMul" and "logits" in n.output]
    if vocab and not vocab[0]:
        raise StepError(f"{src}: the MatMul producing the logits has no name; the int4 export cannot select it")
    int8 = list(vocab) if spec.vocab_layout == "int8_dynamic" else []
    if spec.cross_kv_layout == "int8_dynamic":
        int8 += [n.name for n in model.graph.node if n.op_type == "MatMul" and ENCODER_STATES in n.input]
    if int8:
        model = int8_nodes(model, int8)
    model = _nbits(model, spec, spec.bits, level)
    share = share_tied_embedding_int8 if spec.vocab_layout == "int8_dynamic" else share_tied_embedding_nbits
    shared = bool(vocab) and share(model)
    ONNXModel(model).save_model_to_file(str(dst), use_external_data_format=True)
    return shared
