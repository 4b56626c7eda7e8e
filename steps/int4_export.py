"""The int4 writer: one ONNX graph -> 4-bit weights, the vocabulary matrix at spec.vocab_bits.

Encoder graph (spec.encoder_layout "int4_int8_kernel"): every MatMul with a constant weight is written
as the int8 scheme writes it (DynamicQuantizeLinear + MatMulInteger), except that its int8 weight is
not in the file: the file holds 4-bit codes packed two per byte and one int8 block multiple per
block (steps/fake_quant.py int4_int8_kernel_codes, the grid QAT trained), and a few integer nodes
multiply them out. ONNX Runtime folds those nodes into the int8 weight when the session loads, then
fuses the int8 kernel (DynamicQuantizeMatMul): int8's speed on the CPU, a 4-bit file.
Decoder graph: MatMulNBits, 4-bit symmetric blocks of spec.group_size along the input dimension, at
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

import numpy as np
import onnx

from contract.quant_spec import QuantSpec

from .common import StepError
from .int8_export import dynamic_int8, int8_nodes
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


def _unpack_nodes(base: str, k: int, n: int, group_size: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes computing the int8 weight `{base}_quantized` [k, n] from `{base}_int4_codes` (int8
    [k/group_size, group_size/2, n]: per block, rows i and group_size/2 + i share a byte, the first as
    code + 8 in the low nibble, the second in two's complement in the high nibble) and
    `{base}_int4_multiples` (int8 [k/group_size, 1, n]). All constant and all int8 (code x multiple in
    [-128, 112]: exact), so ONNX Runtime folds them into the int8 weight when the session loads; int32
    intermediates would hold the load's peak memory at many times the weights'."""
    from onnx import helper, numpy_helper

    c = lambda name: f"{base}_int4_{name}"  # noqa: E731
    consts = [numpy_helper.from_array(np.array(v, dtype=t), c(name)) for name, v, t in (
        ("low_mask", 15, np.int8), ("high_mask", -16, np.int8), ("eight", 8, np.int8), ("sixteen", 16, np.int8),
        ("shape", [k, n], np.int64))]
    op = lambda kind, inputs, out, **kw: helper.make_node(kind, [c(i) for i in inputs], [c(out)], name=c(out), **kw)  # noqa: E731
    nodes = [op("BitwiseAnd", ["codes", "low_mask"], "low_nibble"),
             op("Sub", ["low_nibble", "eight"], "low"),
             op("BitwiseAnd", ["codes", "high_mask"], "high_nibble"),
             op("Div", ["high_nibble", "sixteen"], "high"),
             op("Concat", ["low", "high"], "blocks", axis=1),
             op("Mul", ["blocks", "multiples"], "int8_blocks"),
             helper.make_node("Reshape", [c("int8_blocks"), c("shape")], [f"{base}_quantized"], name=c("int8"))]
    return nodes, consts


def _pack_codes(codes: np.ndarray, group_size: int) -> np.ndarray:
    """codes [k, n] in [-8, 7] -> the int8 [k/group_size, group_size/2, n] layout _unpack_nodes reads."""
    k, n = codes.shape
    blocks = codes.astype(np.int16).reshape(k // group_size, 2, group_size // 2, n)
    low, high = blocks[:, 0] + 8, blocks[:, 1] & 0xF
    return (low | (high << 4)).astype(np.uint8).view(np.int8)


def _int4_int8_kernel(src: Path, dst: Path, spec: QuantSpec) -> None:
    """The encoder's layout (module docstring): the int8 scheme's graph, its int8 weights replaced by the
    4-bit codes and block multiples that fold into them."""
    import tempfile

    import torch
    from onnx import numpy_helper
    from onnxruntime.quantization.onnx_model import ONNXModel

    from .fake_quant import int4_int8_kernel_codes

    source = onnx.load(str(src), load_external_data=False)
    opset = next((o.version for o in source.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 18:
        raise StepError(f"{src}: opset {opset}; the int4 encoder's unpacking needs BitwiseAnd (opset 18 or later)")
    floats = {i.name: i for i in source.graph.initializer}
    with tempfile.TemporaryDirectory() as tmp:
        dynamic_int8(str(src), Path(tmp) / "int8.onnx", external=True)
        model = onnx.load(str(Path(tmp) / "int8.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    unpack, added, dropped = [], [], set()
    for name in [i for i in inits if i.endswith("_quantized") and inits[i].data_type == onnx.TensorProto.INT8]:
        base = name[: -len("_quantized")]
        if base not in floats or len(inits[name].dims) != 2:
            raise StepError(f"{src}: int4 encoder export: no float weight {base!r} of 2 dimensions for {name}")
        w = numpy_helper.to_array(floats[base], base_dir=str(src.parent))  # [k, n] = the Linear's weight.T
        k, n = w.shape
        if k % spec.group_size or spec.group_size % 2:
            raise StepError(f"{src}: weight {base!r} has {k} inputs: the int4 encoder needs a multiple of an even "
                            f"group_size ({spec.group_size})")
        codes, multiples, scale = (t.numpy() for t in int4_int8_kernel_codes(torch.from_numpy(w.T.copy()), spec.group_size))
        nodes, consts = _unpack_nodes(base, k, n, spec.group_size)
        unpack += nodes
        added += consts + [numpy_helper.from_array(_pack_codes(codes.T, spec.group_size), f"{base}_int4_codes"),
                           numpy_helper.from_array(multiples.T.astype(np.int8).reshape(k // spec.group_size, 1, n),
                                                   f"{base}_int4_multiples"),
                           numpy_helper.from_array(scale.astype(np.float32), f"{base}_scale")]
        dropped |= {name, f"{base}_scale"}
    if not unpack:
        raise StepError(f"{src}: int4 encoder export found no MatMul with a constant weight")
    kept = [i for i in model.graph.initializer if i.name not in dropped]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + added)
    rest = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(unpack + rest)
    ONNXModel(model).save_model_to_file(str(dst), use_external_data_format=True)


ENCODER_STATES = "encoder_hidden_states"  # the decoder graph's input the cross-attention keys/values read


def quantize_int4(src: Path, dst: Path, spec: QuantSpec, part: str) -> bool:
    """Write src, the "encoder" or a "decoder" graph, as int4 into dst (external data). Returns whether the
    tied token embedding reads the quantized vocabulary matrix."""
    from onnxruntime.quantization.onnx_model import ONNXModel

    if part not in ("encoder", "decoder"):
        raise ValueError(f"part must be 'encoder' or 'decoder', got {part!r}")
    if part == "encoder" and spec.encoder_layout == "int4_int8_kernel":
        _int4_int8_kernel(src, dst, spec)
        return False
    level = spec.encoder_accuracy_level if part == "encoder" else spec.decoder_accuracy_level
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
