"""Fuse the Whisper encoder's self-attention into ONNX Runtime's MultiHeadAttention operator.

The exported encoder computes attention as separate nodes per layer:

    q = (x Wq + bq) * s      -> Reshape [B, S, H, d] -> Transpose (0,2,1,3) [-> Mul c]
    k =  x Wk                -> Reshape              -> Transpose (0,2,3,1) [-> Mul c]
    v =  x Wv + bv           -> Reshape              -> Transpose (0,2,1,3)
    out = Softmax(q k) v     -> Transpose (0,2,1,3) -> Reshape [B, S, H*d]

On 1500 frames the two fp32 attention MatMuls and the Softmax are the biggest cost of the int8
encoder (they multiply two activations, so dynamic quantization leaves them fp32). One
``com.microsoft.MultiHeadAttention(q, k, v)`` node per layer computes the same thing with a
fused kernel, from the projections' outputs, with ``scale`` = the product of the scalar Muls.
The projections stay ordinary MatMuls, so quantization treats them exactly as before.

Only unmasked attention whose intermediates nothing else reads is fused; anything that does not
match is left as it is. convert applies it to encoders.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

MS_DOMAIN = "com.microsoft"


class _Graph:
    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in graph.node:
            for x in n.input:
                self.consumers.setdefault(x, []).append(n)
        self.inits = {i.name: i for i in graph.initializer}

    def const(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        p = self.producer.get(name)
        if p is not None and p.op_type == "Constant":
            return numpy_helper.to_array(next(a.t for a in p.attribute if a.name == "value"))
        return None

    def only_consumer(self, name: str, op: str):
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op else None

    def scalar_mul(self, node) -> tuple[str, float] | None:
        """(the non-constant input, the scalar) of a Mul by a scalar constant."""
        if node is None or node.op_type != "Mul":
            return None
        for a, b in ((0, 1), (1, 0)):
            c = self.const(node.input[b])
            if c is not None and c.size == 1:
                return node.input[a], float(c.reshape(()))
        return None


def _perm(node) -> list[int]:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), [])


def _head_input(g: _Graph, name: str, perm: list[int], nodes: list) -> tuple[str, float] | None:
    """Walk back from a per-head tensor to the [B, S, D] projection output; (source, scale)."""
    scale = 1.0
    node = g.producer.get(name)
    mul = g.scalar_mul(node)
    if mul is not None:  # a Mul after the Transpose
        nodes.append(node)
        name, s = mul
        scale *= s
        node = g.producer.get(name)
    if node is None or node.op_type != "Transpose" or _perm(node) != perm:
        return None
    reshape = g.producer.get(node.input[0])
    if reshape is None or reshape.op_type != "Reshape":
        return None
    nodes += [node, reshape]
    src = reshape.input[0]
    mul = g.scalar_mul(g.producer.get(src))
    if mul is not None and len(g.consumers.get(src, [])) == 1:  # a Mul before the Reshape (q * s)
        nodes.append(g.producer[src])
        src, s = mul
        scale *= s
    return src, scale


def _match(g: _Graph, softmax) -> tuple[str, str, str, str, float, list] | None:
    """(q, k, v, output, scale, nodes to remove) of one attention, or None if it does not match."""
    axis = next((a.i for a in softmax.attribute if a.name == "axis"), -1)
    qk = g.producer.get(softmax.input[0])
    pv = g.only_consumer(softmax.output[0], "MatMul")
    if axis not in (-1, 3) or qk is None or qk.op_type != "MatMul" or pv is None or pv.input[0] != softmax.output[0]:
        return None
    out_t = g.only_consumer(pv.output[0], "Transpose")
    out_r = g.only_consumer(out_t.output[0], "Reshape") if out_t is not None and _perm(out_t) == [0, 2, 1, 3] else None
    if out_r is None:
        return None
    nodes = [qk, softmax, pv, out_t, out_r]
    q = _head_input(g, qk.input[0], [0, 2, 1, 3], nodes)
    k = _head_input(g, qk.input[1], [0, 2, 3, 1], nodes)
    v = _head_input(g, pv.input[1], [0, 2, 1, 3], nodes)
    if q is None or k is None or v is None or v[1] != 1.0:
        return None
    # every intermediate must be private to the block (a decoder exports its per-head k/v as "present")
    removed = {id(n) for n in nodes}
    graph_outputs = {o.name for o in g.graph.output}
    for n in nodes:
        for o in n.output:
            if o != out_r.output[0] and (o in graph_outputs or any(id(c) not in removed for c in g.consumers.get(o, []))):
                return None
    return q[0], k[0], v[0], out_r.output[0], q[1] * k[1], nodes


def _prune(graph: onnx.GraphProto) -> None:
    """Drop nodes whose outputs nothing uses any more (the removed attention's shape arithmetic)."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {x for n in graph.node for x in n.input} | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            return
        for n in dead:
            graph.node.remove(n)


def fuse_attention(model: onnx.ModelProto, num_heads: int) -> int:
    """Replace every unmasked attention block with MultiHeadAttention; returns how many."""
    g = _Graph(model.graph)
    removed: set[int] = set()
    added = []
    for softmax in [n for n in model.graph.node if n.op_type == "Softmax"]:
        m = _match(g, softmax)
        if m is None:
            continue
        q, k, v, out, scale, nodes = m
        removed.update(id(n) for n in nodes)
        added.append(helper.make_node("MultiHeadAttention", [q, k, v], [out], domain=MS_DOMAIN,
                                      name=softmax.name.rsplit("/", 1)[0] + "/MultiHeadAttention",
                                      num_heads=num_heads, scale=scale))
    if added:
        # the fused nodes go where their inputs allow (k and v are produced after q)
        _rebuild_in_order(model.graph, [n for n in model.graph.node if id(n) not in removed] + added)
        _prune(model.graph)
        if not any(o.domain == MS_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return len(added)


def _rebuild_in_order(graph: onnx.GraphProto, nodes: list) -> None:
    """Set graph.node to nodes, each after the producers of its inputs."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = nodes, []
    while pending:
        ready = [n for n in pending if all(x in available for x in n.input)]
        if not ready:
            raise ValueError("graph has a cycle or an undefined input after attention fusion")
        for n in ready:
            ordered.append(n)
            available.update(n.output)
        done = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in done]
    del graph.node[:]
    graph.node.extend(ordered)


def fuse_encoder_file(path: Path, num_heads: int) -> int:
    """Fuse in place; weights stored as external data stay where they are (graph only is rewritten)."""
    model = onnx.load(str(path), load_external_data=False)
    fused = fuse_attention(model, num_heads)
    if fused:
        onnx.save(model, str(path))
    return fused
