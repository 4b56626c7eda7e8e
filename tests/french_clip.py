"""The first test-split clip of the committed French fixture, as float32 samples at 16 kHz."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def french_test_clip(french_manifest) -> np.ndarray:
    import soundfile as sf

    row = next(r for r in french_manifest if r["split"] == "test")
    audio, sr = sf.read(Path(__file__).resolve().parent.parent / row["audio"], dtype="float32")
    assert sr == 16000
    return audio
