"""The on-machine Python environment: which build it holds, where it lives, what it must pass.

Stdlib only: `steps/bootstrap.py` imports it with the image's python, before our venv exists, and
the orchestrator imports it to filter offers and to name the interpreter the steps run with.

The steps never run in the image's Python (its torchvision/torchaudio are built for the image's
torch): setup makes a venv `qat/venv/<requirements hash>-<build>/` and installs
requirements-remote.txt into it. The build follows `machine.gpu`: `cuda` (GPU required: the pinned
torch as published, onnxruntime-gpu, and CUDA must be usable from torch) or `cpu` (a CPU run:
onnxruntime). Facts in docs/REFERENCE.md section 7.
"""
from __future__ import annotations

import hashlib
import re

from .layout import REMOTE_CODE, REMOTE_VENVS

GPU_MODES = ("required", "none")
# The torch that requirements-remote.txt pins, and the CUDA its published linux x86_64 wheel is built
# for: torch 2.13.0's wheel depends on nvidia-*-cu13 packages (CUDA 13.0), which need a driver that
# supports CUDA >= 13.0 (`nvidia-smi`'s "CUDA Version", Vast's `cuda_max_good`). A test keeps the pin
# and this table in step.
PINNED_TORCH = "2.13.0"
TORCH_CUDA = {"2.13.0": 13.0}
PINNED_TORCH_CUDA = TORCH_CUDA[PINNED_TORCH]

READY = ".qat-ready"  # written in a venv once it passed its checks
_ORT = re.compile(r"^onnxruntime(?=\s*(?:[<>=!~;\[]|$))", re.IGNORECASE)


def build(gpu: str) -> str:
    """`cuda` when the run needs a GPU, `cpu` when a CPU run is intended (machine.gpu)."""
    if gpu not in GPU_MODES:
        raise ValueError(f"machine.gpu must be one of {GPU_MODES}, got {gpu!r}")
    return "cuda" if gpu == "required" else "cpu"


def requirements_hash(text: bytes) -> str:
    return hashlib.sha256(text).hexdigest()[:12]


def venv_dir(requirements: bytes, gpu: str) -> str:
    """The venv for these requirements and this build, relative to the machine's home."""
    return f"{REMOTE_VENVS}/{requirements_hash(requirements)}-{build(gpu)}"


def steps_python(requirements: bytes, gpu: str) -> str:
    """The venv's interpreter as the steps name it: relative to REMOTE_CODE, where they run."""
    depth = len(REMOTE_CODE.split("/"))
    return "../" * depth + venv_dir(requirements, gpu) + "/bin/python"


def resolved_requirements(text: str, gpu: str) -> str:
    """requirements-remote.txt for this build: onnxruntime becomes onnxruntime-gpu (same version
    spec) when the run needs a GPU; everything else as written."""
    if build(gpu) == "cpu":
        return text
    return "\n".join(_ORT.sub("onnxruntime-gpu", line) for line in text.splitlines()) + "\n"


def pinned_torch(text: str) -> str:
    """The version `torch==X` pins in a requirements text (ValueError when there is no exact pin)."""
    m = re.search(r"^torch==([0-9][0-9A-Za-z.+]*)\s*$", text, re.MULTILINE)
    if not m:
        raise ValueError("requirements-remote.txt must pin torch exactly (torch==X.Y.Z): the CUDA it needs "
                         "decides which machines may be rented")
    return m.group(1)
