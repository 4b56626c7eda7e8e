"""Load-time memory of the int4 encoder's weight layouts: what ONNX Runtime's constant folding holds.

    python -m benchmarks.int4_fold_memory      # writes benchmarks/int4_fold_memory.json

Eight 1280 x 5120 weights (whisper-large-v3's fc1 shape), each behind DynamicQuantizeLinear +
MatMulInteger, stored two ways: plain int8 (the int8 scheme) and the int4 encoder's layout, built by
the export's own steps/int4_export.py int4_weight (ONNX INT4 codes, Cast, Mul by the block multiples,
Reshape; opset 21). Each file is loaded and run once per fresh process, in RUNS processes; the peak
resident memory (VmHWM) is what folding the weights costs, its median and range recorded. The outputs
of the two are compared (the same integer weights, the same result).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "int4_fold_memory.json"
K, N, GROUP, LAYERS = 1280, 5120, 32, 8
RUNS = 7  # fresh processes per layout: the int4 peak varies by tens of MB from run to run (median reported)
PROBE = """
import sys, numpy as np, onnxruntime as ort
hwm = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024
before = hwm()
s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
y = s.run(None, {"x": np.ones((1500, %d), np.float32)})[0]
print(before, hwm(), float(np.abs(y).sum()))
""" % K


def build(layout: str, path: Path) -> float:
    from onnx import TensorProto, helper, numpy_helper, save

    from steps.int4_export import INT4_OPSET, int4_weight

    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(LAYERS):
        codes = rng.integers(-8, 8, size=(K, N)).astype(np.int8)
        mult = rng.integers(1, 17, size=(K // GROUP, N)).astype(np.int8)
        w = f"w{i}"
        if layout == "int8":
            inits.append(numpy_helper.from_array(
                (codes.reshape(K // GROUP, GROUP, N) * mult[:, None]).reshape(K, N).astype(np.int8), f"{w}_quantized"))
        else:
            more, weight_inits = int4_weight(w, codes, mult)
            nodes += more
            inits += weight_inits
        inits.append(numpy_helper.from_array(np.arange(K, dtype=np.int64), f"keep{i}"))
        nodes += [helper.make_node("DynamicQuantizeLinear", [prev], [f"q{i}", f"qs{i}", f"qz{i}"]),
                  helper.make_node("MatMulInteger", [f"q{i}", f"{w}_quantized", f"qz{i}"], [f"mi{i}"]),
                  helper.make_node("Cast", [f"mi{i}"], [f"mf{i}"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", [f"mf{i}", f"qs{i}"], [f"y{i}"]),
                  helper.make_node("Gather", [f"y{i}", f"keep{i}"], [f"o{i}"], axis=1)]  # N -> K for the next layer
        prev = f"o{i}"
    graph = helper.make_graph(nodes, "fold", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1500, K])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, None)], inits)
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", INT4_OPSET)]), str(path))
    return path.stat().st_size / 1e6


def main() -> int:
    import onnxruntime

    out = {"command": "python -m benchmarks.int4_fold_memory", "onnxruntime": onnxruntime.__version__,
           "weights": f"{LAYERS} x {K}x{N}", "runs": RUNS, "int8_weights_mb": round(LAYERS * K * N / 1e6, 1), "layouts": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for layout in ("int8", "int4_shipped"):
            path = Path(tmp) / f"{layout}.onnx"
            mb = build(layout, path)
            runs = [[float(v) for v in subprocess.run(
                [sys.executable, "-c", PROBE, str(path)], check=True, capture_output=True, text=True,
                env={**os.environ, "OMP_NUM_THREADS": "2"}).stdout.split()] for _ in range(RUNS)]
            peaks = sorted(r[1] for r in runs)
            out["layouts"][layout] = {"file_mb": round(mb, 1), "peak_rss_mb": round(statistics.median(peaks)),
                                      "peak_rss_mb_range": [round(peaks[0]), round(peaks[-1])],
                                      "import_rss_mb": round(runs[0][0]), "output_abs_sum": sorted({r[2] for r in runs})}
            print(layout, out["layouts"][layout], flush=True)
    sums = {s for v in out["layouts"].values() for s in v["output_abs_sum"]}
    out["same_outputs"] = len(sums) == 1
    base = out["layouts"]["int8"]["peak_rss_mb"]
    for v in out["layouts"].values():
        v["over_int8_x_weights"] = round((v["peak_rss_mb"] - base) / out["int8_weights_mb"], 2)
    OUT.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {OUT}")
    return 0 if out["same_outputs"] else 1


if __name__ == "__main__":
    sys.exit(main())
