"""The tied output projection and token embedding in a quantized graph: one matrix, stored once.

Whisper ties proj_out (hidden -> logits) to the decoder's token embedding. The exporter writes the
projection as a runtime Transpose of the table (fold_transposed_weights makes it a constant the
quantizers see); after quantization the embedding's Gather is rewired to read the quantized
projection (int8 rows times their scales, or MatMulNBits blocks through GatherBlockQuantized) and
the fp32 table is dropped. steps/convert.py and steps/int4_export.py use these.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper


def load_folded(path: Path) -> onnx.ModelProto:
    """A graph with its transposed constant weights folded (fold_transposed_weights)."""
    model = onnx.load(str(path))
    fold_transposed_weights(model)
    return model


def fold_transposed_weights(model: onnx.ModelProto) -> int:
    """Replace MatMul(x, Transpose(W)) by MatMul(x, W.T) with W.T a constant; returns how many.

    The tied proj_out is exported as a runtime Transpose of the embedding on some exporter
    versions; quantizers only see constant MatMul weights, so the biggest MatMul would stay fp32.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    folded = 0
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] in inits:
            continue
        t = producer.get(node.input[1])
        if t is None or t.op_type != "Transpose" or t.input[0] not in inits:
            continue
        w = numpy_helper.to_array(inits[t.input[0]])
        perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), None)
        name = t.input[0] + "_transposed"
        if name not in inits:
            inits[name] = numpy_helper.from_array(np.ascontiguousarray(np.transpose(w, perm)), name)
            graph.initializer.append(inits[name])
        node.input[1] = name
        folded += 1
    return folded


def share_tied_embedding_int8(model: onnx.ModelProto) -> bool:
    """Let the token embedding read the int8 output projection instead of its own fp32 copy.

    Whisper ties proj_out to embed_tokens; after quantization the graph holds both the fp32
    table (V x D, the biggest tensor) and the int8 proj_out weight (D x V) with per-token scales.
    When the int8 weight dequantizes back to the table (within half a step), the Gather is
    rewired to Transpose(int8 weight) rows times their scales and the fp32 table is dropped.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[0] in inits
               and len(inits[n.input[0]].dims) == 2 and inits[n.input[0]].data_type == onnx.TensorProto.FLOAT]
    matmuls = [n for n in graph.node if n.op_type == "MatMulInteger" and n.input[1] in inits
               and inits[n.input[1]].data_type == onnx.TensorProto.INT8]
    for g in gathers:
        table = numpy_helper.to_array(inits[g.input[0]])
        vocab, d = table.shape
        for mm in matmuls:
            if list(inits[mm.input[1]].dims) != [d, vocab]:
                continue
            zp = numpy_helper.to_array(inits[mm.input[3]]) if len(mm.input) > 3 and mm.input[3] in inits else 0
            scale_name = _scale_init_name(graph, mm, inits, vocab)
            if scale_name is None or np.any(zp != 0):
                continue  # only symmetric weights with a known per-channel scale
            scale = numpy_helper.to_array(inits[scale_name]).astype(np.float32)
            wq = numpy_helper.to_array(inits[mm.input[1]])
            err = np.abs(wq.T.astype(np.float32) * scale[:, None] - table)
            if not np.all(err <= 0.5 * scale[:, None] * (1 + 1e-4) + 1e-7):
                continue  # not the same matrix: the embedding is not tied
            _rewire_gather(graph, g, mm.input[1], scale_name)
            return True
    return False


def _scale_init_name(graph, mm, inits, vocab) -> str | None:
    """The per-channel weight-scale initializer (length vocab) that multiplies mm's output."""
    consumers = {}
    for n in graph.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    producer = {o: n for n in graph.node for o in n.output}
    cast = next((n for n in consumers.get(mm.output[0], []) if n.op_type == "Cast"), None)
    mul = next((n for n in consumers.get(cast.output[0], []) if n.op_type == "Mul"), None) if cast else None
    if mul is None:
        return None
    for x in mul.input:
        p = producer.get(x)
        for y in (p.input if p is not None and p.op_type == "Mul" else [x]):
            if y in inits and list(inits[y].dims) == [vocab]:
                return y
    return None


def _rewire_gather(graph, gather, wq_name: str, scale_name: str) -> None:
    """table[ids] -> float(Transpose(wq)[ids]) * scale[ids][..., None]; drops the fp32 table."""
    ids = gather.input[1]
    p = gather.name or "tied_embedding"
    axes = p + "_axes"
    graph.initializer.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), axes))
    nodes = [
        onnx.helper.make_node("Transpose", [wq_name], [p + "_table_int8"], perm=[1, 0], name=p + "_T"),
        onnx.helper.make_node("Gather", [p + "_table_int8", ids], [p + "_rows_int8"], axis=0, name=p + "_rows"),
        onnx.helper.make_node("Cast", [p + "_rows_int8"], [p + "_rows_f"], to=onnx.TensorProto.FLOAT, name=p + "_cast"),
        onnx.helper.make_node("Gather", [scale_name, ids], [p + "_row_scale"], axis=0, name=p + "_scales"),
        onnx.helper.make_node("Unsqueeze", [p + "_row_scale", axes], [p + "_row_scale_u"], name=p + "_unsq"),
        onnx.helper.make_node("Mul", [p + "_rows_f", p + "_row_scale_u"], [gather.output[0]], name=p + "_dequant"),
    ]
    _replace_gather(graph, gather, nodes)


def _replace_gather(graph, gather, nodes: list) -> None:
    """Put `nodes` where the tied embedding's Gather was; drop its fp32 table once nothing reads it."""
    table_name = gather.input[0]
    index = list(graph.node).index(gather)
    graph.node.remove(gather)
    for k, n in enumerate(nodes):
        graph.node.insert(index + k, n)
    if not any(table_name in n.input for n in graph.node):
        graph.initializer.remove(next(i for i in graph.initializer if i.name == table_name))


def _nbits_values(packed: np.ndarray, bits: int, vocab: int, d: int) -> np.ndarray:
    """MatMulNBits' packed uint8 blocks -> signed integer values [vocab, d] (zero point 2^(bits-1))."""
    packed = packed.reshape(vocab, -1)
    if bits == 4:  # two values per byte, low nibble first
        packed = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(vocab, -1)
    return packed[:, :d].astype(np.int16) - 2 ** (bits - 1)


def share_tied_embedding_nbits(model: onnx.ModelProto) -> bool:
    """Let the token embedding read the weight-only output projection's blocks (GatherBlockQuantized).

    MatMulNBits stores proj_out (the MatMul producing the logits) as uint8 [vocab, K/block, block*bits/8]
    (symmetric, zero point 2^(bits-1), low nibble first at 4 bits) with scales [vocab, K/block]: exactly
    GatherBlockQuantized's packed uint8 layout with the same bits and block size. When those blocks
    dequantize back to the fp32 token table within one step (the weights are tied: rounding moves a
    weight by half a step, the clamp of +2^(bits-1) to 2^(bits-1) - 1 by one), the Gather reads them
    and the fp32 table is dropped.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    attrs = lambda n: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}  # noqa: E731
    mm = next((n for n in graph.node if n.op_type == "MatMulNBits" and "logits" in n.output), None)
    if mm is None or mm.input[1] not in inits or mm.input[2] not in inits or (len(mm.input) > 3 and mm.input[3]):
        return False
    ma = attrs(mm)
    vocab, d, bits, block = ma["N"], ma["K"], ma.get("bits", 4), ma["block_size"]
    if d % block:
        return False  # padded blocks: GatherBlockQuantized would return rows longer than the table's
    packed = numpy_helper.to_array(inits[mm.input[1]])
    scale = np.repeat(numpy_helper.to_array(inits[mm.input[2]]).reshape(vocab, -1), block, axis=1)[:, :d]
    dequantized = _nbits_values(packed, bits, vocab, d) * scale
    for g in graph.node:
        if g.op_type != "Gather" or g.input[0] not in inits or list(inits[g.input[0]].dims) != [vocab, d]:
            continue
        table = numpy_helper.to_array(inits[g.input[0]])
        if not np.all(np.abs(dequantized - table) <= np.abs(scale) * (1 + 1e-4) + 1e-7):
            continue  # not the same matrix: the embedding is not tied
        p = g.name or "tied_embedding"
        shape = numpy_helper.from_array(np.array([vocab, packed.size // vocab], dtype=np.int64), p + "_shape")
        graph.initializer.append(shape)
        _replace_gather(graph, g, [
            onnx.helper.make_node("Reshape", [mm.input[1], shape.name], [p + "_packed"], name=p + "_reshape"),
            onnx.helper.make_node("GatherBlockQuantized", [p + "_packed", g.input[1], mm.input[2]], list(g.output),
                                  name=p + "_q", domain="com.microsoft", gather_axis=0, quantize_axis=1,
                                  block_size=block, bits=bits)])
        return True
    return False




