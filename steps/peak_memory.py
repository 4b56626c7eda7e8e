"""Peak memory of one model variant: a fresh process loads it and transcribes one clip (steps/bench.py).

A child process, so that what the benchmark's own process has loaded does not count: peak RSS
(VmHWM) and, on CUDA, the device memory the process holds over its baseline before loading.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from . import serving


def _peak_rss_main() -> None:
    """Child process body: load one variant, transcribe one clip, print peak RSS (and on CUDA the
    device memory the process holds, over its baseline before loading) in MiB."""
    from .bench import Decoding, Variant, load_runner

    spec = json.loads(sys.stdin.read())
    variant = Variant(**spec["variant"])
    if variant.device == "cuda":
        import torch

        torch.cuda.init()
        torch.zeros(1, device="cuda")  # the context exists before the baseline reading
        before = serving.cuda_memory_mb()
    runner = load_runner(variant, Decoding(**spec["decoding"]))
    runner.end_to_end(np.load(spec["audio"]))
    # VmHWM, not ru_maxrss: ru_maxrss survives execve and would report the parent's peak
    hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print("PEAK_RSS_MB", hwm_kb / 1024, flush=True)
    if variant.device == "cuda":
        # both PyTorch's caching allocator and ORT's arena keep their peak: held now = peak
        print("PEAK_VRAM_MB", serving.cuda_memory_mb() - before, flush=True)


def peak_memory_mb(variant, dec, audio: np.ndarray, timeout: float = 600) -> dict:
    """{"peak_rss_mb", "peak_vram_mb" (CUDA variants)} of a fresh process that loads the variant and
    transcribes one clip; a figure the child did not print is None."""
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "clip.npy", audio)
        spec = {"variant": asdict(variant), "decoding": asdict(dec), "audio": str(Path(tmp) / "clip.npy")}
        try:
            proc = subprocess.run([sys.executable, "-c", "from steps.peak_memory import _peak_rss_main; _peak_rss_main()"],
                                  input=json.dumps(spec), capture_output=True, text=True, timeout=timeout,
                                  cwd=Path(__file__).resolve().parent.parent)
        except subprocess.TimeoutExpired:
            return {"peak_rss_mb": None}
    out = {"peak_rss_mb": None, **({"peak_vram_mb": None} if variant.device == "cuda" else {})}
    for line in proc.stdout.splitlines():
        key, _, value = line.partition(" ")
        if key in ("PEAK_RSS_MB", "PEAK_VRAM_MB"):
            out[key.lower()] = round(float(value), 1)
    return out
