"""A model's size on disk, one rule for every step that reports it (convert records it for what it
wrote, bench for what it ran): the weight files only, in MB (1e6 bytes)."""
from __future__ import annotations

from pathlib import Path

# Weight files per model kind; a PyTorch folder's *.bin count only when it has no safetensors.
WEIGHT_FILES = {"pytorch": ("*.safetensors",), "onnx": ("*.onnx", "*.onnx_data", "*.data"), "ctranslate2": ("model.bin",)}


def weights_mb(path: Path, kind: str) -> float:
    """Size of the weight files directly in folder `path` of a model of `kind` (WEIGHT_FILES)."""
    p = Path(path)
    files = {f for pattern in WEIGHT_FILES[kind] for f in p.glob(pattern) if f.is_file()}
    if kind == "pytorch" and not files:
        files = {f for f in p.glob("*.bin") if f.is_file()}
    return round(sum(f.stat().st_size for f in files) / 1e6, 3)
