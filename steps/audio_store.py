"""How prepare stores a clip, and how its readers (train, evaluate, bench) get it back.

A clip is stored once, as 16-bit PCM at 16 kHz in the `audio` column (int16: 32,000 bytes per
second, lossless for 16-bit sources such as MLS French's FLAC). Log-mel features are not stored:
the train step's data loader computes them from the clip (`log_mel`), so a row of a 15 s clip
takes ~0.48 MB instead of 1.76 MB (float32 audio + float32 128 x 3000 features).
benchmarks/prepare_size.json has the measured bytes per row and the loader's cost per sample.
"""
from __future__ import annotations

import numpy as np

SAMPLE_RATE = 16000
PCM_SCALE = 32768.0  # int16 full scale: float x in [-1, 1) <-> round(x * 32768)
PCM_BYTES_PER_SECOND = 2 * SAMPLE_RATE


def to_pcm16(audio: np.ndarray) -> np.ndarray:
    """Float samples (nominally in [-1, 1]) -> int16; values past full scale are clipped."""
    return np.clip(np.rint(np.asarray(audio, dtype=np.float32) * PCM_SCALE), -32768, 32767).astype(np.int16)


def to_float(stored) -> np.ndarray:
    """A stored clip as float32 in [-1, 1]: int16 PCM is scaled; float audio (datasets written
    before clips were stored as int16) is returned as it is."""
    a = np.asarray(stored)
    if a.dtype.kind in "iu":
        return a.astype(np.float32) / PCM_SCALE
    return a.astype(np.float32, copy=False)


def log_mel(feature_extractor, clips) -> np.ndarray:
    """(n, n_mels, frames) float32 log-mel features of stored clips, as the model reads them."""
    return feature_extractor([to_float(c) for c in clips], sampling_rate=SAMPLE_RATE,
                             return_tensors="np").input_features.astype(np.float32, copy=False)
