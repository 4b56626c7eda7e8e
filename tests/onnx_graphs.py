"""A one-MatMul ONNX graph and random weights for it: the quantization grids are checked on it
against what ONNX Runtime itself produces (tests/test_fake_quant.py, tests/test_bench.py)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def matmul_model(w: np.ndarray, out: str = "Y") -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], [out], name="mm")], "mm",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["b", w.shape[0]])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["b", w.shape[1]])],
        [numpy_helper.from_array(w, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def random_weights(k: int, n: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((k, n)) * 0.05).astype(np.float32)
