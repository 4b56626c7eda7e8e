"""The int8 writer: ONNX Runtime dynamic quantization, the grid of contract/quant_spec.py's int8.

MatMul weights per output channel (symmetric int8, max|w|/127), activations uint8 per call at run
time (DynamicQuantizeLinear), never Conv (ConvInteger has no CPU kernel). The int4 writer uses the
same call for its 8-bit vocabulary (steps/int4_export.py).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import onnx

from .tied_embedding import load_folded, share_tied_embedding_int8


def dynamic_int8(model: onnx.ModelProto | str, dst: Path, external: bool = False,
                 nodes: list[str] | None = None) -> None:
    """quantize_dynamic with the int8 grid into dst; `nodes`: only these MatMuls (default: every one)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(model, str(dst), op_types_to_quantize=["MatMul"], nodes_to_quantize=nodes, per_channel=True,
                     reduce_range=False, weight_type=QuantType.QInt8, use_external_data_format=external,
                     extra_options={"MatMulConstBOnly": True})


def int8_nodes(model: onnx.ModelProto, nodes: list[str]) -> onnx.ModelProto:
    """The model with only `nodes` quantized as dynamic_int8 does."""
    with tempfile.TemporaryDirectory() as tmp:
        dynamic_int8(model, Path(tmp) / "part.onnx", nodes=nodes)
        return onnx.load(str(Path(tmp) / "part.onnx"))


def _has_external_data(path: Path) -> bool:
    model = onnx.load(str(path), load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def quantize_int8(src: Path, dst: Path) -> bool:
    """Dynamic int8 of every MatMul with a constant weight. Returns whether the tied token embedding now
    reads the int8 output projection."""
    # a graph with external data (large encoders) may exceed protobuf's 2 GB: let ORT load it by path
    big = _has_external_data(src)
    dynamic_int8(str(src) if big else load_folded(src), dst, external=big)
    if big:
        return False
    model = onnx.load(str(dst))
    shared = share_tied_embedding_int8(model)
    if shared:
        onnx.save(model, str(dst))
    return shared
