"""The int4 writer: one ONNX graph -> 4-bit weights, the vocabulary matrix at spec.vocab_bits.

Encoder graph (spec.encoder_layout "int4_int8_kernel"): every MatMul with a constant weight is written
as the int8 scheme writes it (DynamicQuantizeLinear + MatMulInteger), except that its int8 weight is
not in the file: the file holds 4-bit codes (ONNX INT4, two per byte) and one int8 block multiple per
block (steps/fake_quant.py int4_int8_kernel_codes, the grid QAT trained), and Cast, Mul and Reshape
nodes multiply them out (so the encoder graph is written at opset 21, the first whose Cast reads INT4).
ONNX Runtime folds those nodes into the int8 weight when the session loads, then fuses the int8 kernel
(DynamicQuantizeMatMul): int8's speed on the CPU, a 4-bit file.
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


INT4_OPSET = 21  # the first opset whose Cast reads ONNX INT4 tensors
INT4_IR_VERSION = 10  # the first IR version with the INT4 type (and the one of opset 21)


def _int4_codes_tensor(codes: np.ndarray, name: str) -> onnx.TensorProto:
    """codes (any shape, values in [-8, 7]) -> an ONNX INT4 initializer: two codes per byte, the first
    of each pair in the low nibble (raw bytes, so the external-data writer moves it out of the graph)."""
    flat = (codes.reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return onnx.helper.make_tensor(name, onnx.TensorProto.INT4, codes.shape, (flat[0::2] | (flat[1::2] << 4)).tobytes(),
                                   raw=True)


def int4_weight(base: str, codes: np.ndarray, multiples: np.ndarray) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes and initializers computing the int8 weight `{base}_quantized` [k, n] = codes [k, n] x the
    block multiples [k / group_size, n] (blocks of group_size rows): `{base}_int4_codes`, ONNX INT4
    [k / group_size, group_size, n], Cast to int8, Mul by `{base}_int4_multiples` (int8
    [k / group_size, 1, n]; code x multiple in [-128, 112]: exact), Reshape to [k, n]. All constant, so
    ONNX Runtime folds them into the int8 weight when the session loads, holding int8 intermediates
    while it does (benchmarks/int4_fold_memory.py measures what that costs)."""
    from onnx import helper, numpy_helper

    k, n = codes.shape
    blocks = multiples.shape[0]
    c = lambda name: f"{base}_int4_{name}"  # noqa: E731
    inits = [_int4_codes_tensor(codes.reshape(blocks, k // blocks, n), c("codes")),
             numpy_helper.from_array(multiples.astype(np.int8).reshape(blocks, 1, n), c("multiples")),
             numpy_helper.from_array(np.array([k, n], np.int64), c("shape"))]
    nodes = [helper.make_node("Cast", [c("codes")], [c("int8_codes")], name=c("cast"), to=onnx.TensorProto.INT8),
             helper.make_node("Mul", [c("int8_codes"), c("multiples")], [c("int8_blocks")], name=c("mul")),
             helper.make_node("Reshape", [c("int8_blocks"), c("shape")], [f"{base}_quantized"], name=c("int8"))]
    return nodes, inits


def _for_int4(model: onnx.ModelProto) -> None:
    """Raise the default domain's opset to INT4_OPSET and the IR version to INT4_IR_VERSION (onnxruntime
    1.22 reads up to IR 10). Safe for the graphs exported here: from opset 18 to 21 the ops they use
    only gained types (Cast, Reshape, ...); the ONNX checker and ONNX Runtime check every node against
    the new opset's schema (the export's tests run both)."""
    model.ir_version = max(model.ir_version, INT4_IR_VERSION)
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = max(o.version, INT4_OPSET)


def _int4_int8_kernel(src: Path, dst: Path, spec: QuantSpec) -> None:
    """The encoder's layout (module docstring): the int8 scheme's graph, its int8 weights replaced by the
    4-bit codes and block multiples that fold into them."""
    import tempfile

    import torch
    from onnx import numpy_helper
    from onnxruntime.quantization.onnx_model import ONNXModel

    from .fake_quant import int4_int8_kernel_codes

    source = onnx.load(str(src), load_external_data=False)
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
        if k % spec.group_size:
            raise StepError(f"{src}: weight {base!r} has {k} inputs: the int4 encoder needs a multiple of "
                            f"group_size ({spec.group_size})")
        codes, multiples, scale = (t.numpy() for t in int4_int8_kernel_codes(torch.from_numpy(w.T.copy()), spec.group_size))
        nodes, inits_of_weight = int4_weight(base, codes.T, multiples.T)
        unpack += nodes
        added += inits_of_weight + [numpy_helper.from_array(scale.astype(np.float32), f"{base}_scale")]
        dropped |= {name, f"{base}_scale"}
    if not unpack:
        raise StepError(f"{src}: int4 encoder export found no MatMul with a constant weight")
    kept = [i for i in model.graph.initializer if i.name not in dropped]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + added)
    rest = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(unpack + rest)
    _for_int4(model)
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
