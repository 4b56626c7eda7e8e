"""Serving on each device the machine has: which devices and execution providers are usable, how a
model is put on one, which ONNX nodes an execution provider really runs, and device memory.

Imports neither datasets nor pydantic (nor steps.common): benchmarks/gpu_serve.py runs on a GPU
image that has only torch, transformers, onnxruntime(-gpu) and optionally torchao.

Comparisons are like for like: every figure is measured on one device, against a reference on the
same device (PyTorch fp16 on CUDA, PyTorch fp32 on the CPU). Nothing divides a CUDA time by a CPU one.
"""
from __future__ import annotations

import collections
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# PyTorch precisions a CUDA section serves the same trained weights in: fp16 is the guide's baseline;
# int8/int4 are torchao weight-only kernels (int4: tinygemm, bf16 activations, groups of 32).
TORCH_PRECISIONS = ("fp32", "fp16", "int8_weight_only", "int4_weight_only")


def cuda_usable() -> str | None:
    """None when a CUDA device can run work, else why not (the GPU section is skipped with it)."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    try:
        torch.zeros(1, device="cuda").add_(1)
        torch.cuda.synchronize()
    except RuntimeError as e:  # a driver/toolkit mismatch shows up here, not in is_available()
        return f"CUDA present but unusable: {e}"
    return None


def ort_provider(device: str) -> str | None:
    """The ONNX Runtime execution provider for a device, or None when this onnxruntime lacks it."""
    import onnxruntime as ort

    wanted = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
    return wanted if wanted in ort.get_available_providers() else None


_PLACED = re.compile(r"placed on \[(\w+)\]\. Number of nodes: (\d+)")
_NODE = re.compile(r"VerifyEachNodeIsAssignedToAnEp\]\s+(\w+) \((.*)\)\s*$")


def parse_placements(log: str) -> dict:
    """ONNX Runtime's verbose "Node placements" lines -> {provider: node count, "cpu_ops": {op: n}}."""
    counts: dict[str, int] = {}
    cpu_ops: collections.Counter = collections.Counter()
    current = None
    for line in log.splitlines():
        m = _PLACED.search(line)
        if m:
            current = m.group(1)
            counts[current] = counts.get(current, 0) + int(m.group(2))
            continue
        n = _NODE.search(line)
        if n and current == "CPUExecutionProvider":
            cpu_ops[n.group(1)] += 1
    return {**counts, "cpu_ops": dict(cpu_ops)}


def _placement_main() -> None:
    """Child body: open one session verbosely (the placement log goes to this process's stderr)."""
    import onnxruntime as ort

    path, provider = sys.argv[1], sys.argv[2]
    so = ort.SessionOptions()
    so.log_severity_level = 0
    ort.InferenceSession(path, so, providers=[provider, "CPUExecutionProvider"])


def node_placement(onnx_path: Path, provider: str, timeout: float = 300) -> dict:
    """Which execution provider runs how many nodes of a graph (and which ops fell back to the CPU).

    ORT logs the assignment only at verbose level, from C++; a child process keeps that log apart."""
    proc = subprocess.run([sys.executable, "-c", "import sys; from steps.serving import _placement_main; "
                           "_placement_main()", str(onnx_path), provider],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return parse_placements(proc.stderr + proc.stdout)


def place_torch_model(model, device: str, precision: str, group_size: int = 32):
    """The model on `device` in `precision` (TORCH_PRECISIONS); torchao for the weight-only kernels.

    int4 weight-only runs torchao's tinygemm layout (torch._weight_int4pack_mm, bf16 activations,
    asymmetric groups): the same QAT weights, but not ORT's symmetric grid, so its WER is not the
    ONNX int4 model's; proj_out (the vocabulary) is int8 weight-only there, as the int4 export keeps
    it at 8 bits (quant.vocab_bits). int8 weight-only is per-channel symmetric like the ONNX int8 weights."""
    import torch

    if precision not in TORCH_PRECISIONS:
        raise ValueError(f"precision {precision!r}: use one of {TORCH_PRECISIONS}")
    if precision == "fp32":
        return model.to(device)
    if precision == "fp16":
        return model.to(device, dtype=torch.float16)
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    if precision == "int8_weight_only":
        model = model.to(device, dtype=torch.float16)
        quantize_(model, Int8WeightOnlyConfig())
        return model
    model = model.to(device, dtype=torch.bfloat16)
    quantize_(model, Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d"),
              filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn != "proj_out")
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: fqn == "proj_out")
    return model


def cuda_memory_mb() -> float:
    """CUDA memory in use on the device now (total - free): a fresh process's growth over a baseline
    reading is what it holds, whoever allocated it (PyTorch's caching allocator or ORT's arena)."""
    import torch

    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**20


def weights_mb(model) -> float:
    """Bytes of a PyTorch model's parameters and buffers as held (quantized tensors included)."""
    import torch

    def nbytes(t) -> int:
        inner = getattr(t, "__tensor_flatten__", None)
        if inner is not None:  # torchao tensor subclass: sum its inner tensors
            names, _ = t.__tensor_flatten__()
            return sum(nbytes(getattr(t, n)) for n in names)
        return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0

    return round(sum(nbytes(p) for p in model.parameters()) / 1e6 + sum(nbytes(b) for b in model.buffers()) / 1e6, 3)


def describe(device: str, provider: str) -> dict:
    """What every result row carries: the device (by name) and the execution provider."""
    name = "cpu"
    if device == "cuda":
        import torch

        name = torch.cuda.get_device_name(0)
    return {"device": device, "device_name": name, "provider": provider}

