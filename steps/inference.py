"""One transcription API over PyTorch and ONNX Runtime models, used by evaluate and bench.

    t = load_variant("work/convert/qat_int8", "onnx", threads=2)
    texts = t.transcribe([audio_16k_float32, ...], max_new_tokens=128)

Decoding is fixed: greedy, language and task forced (French transcription by default).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch

from .models import load_model, load_processor, resolve_model

Kind = Literal["pytorch", "onnx"]
SAMPLE_RATE = 16000


@dataclass
class Transcriber:
    kind: str
    path: str
    model: Any
    processor: Any
    device: str = "cpu"
    language: str = "fr"
    task: str = "transcribe"

    def features(self, audios: Sequence[np.ndarray]) -> torch.Tensor:
        """Log-mel input features (batch, n_mels, 3000) as float32 on the model's device."""
        arrays = [np.asarray(a, dtype=np.float32) for a in audios]
        feats = self.processor.feature_extractor(arrays, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
        return feats.to(self.device, dtype=torch.float32 if self.kind == "onnx" else self.model.dtype)

    @torch.inference_mode()
    def generate_ids(self, input_features: torch.Tensor, max_new_tokens: int = 128, **kwargs) -> torch.Tensor:
        """Greedy token ids (the forced prefix is not included)."""
        return self.model.generate(input_features=input_features, language=self.language, task=self.task,
                                   max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, **kwargs)

    def transcribe(self, audios: Sequence[np.ndarray], max_new_tokens: int = 128, batch_size: int = 8) -> list[str]:
        """Transcripts of 16 kHz mono float32 clips (each up to 30 s), in order."""
        texts: list[str] = []
        for start in range(0, len(audios), batch_size):
            ids = self.generate_ids(self.features(audios[start:start + batch_size]), max_new_tokens)
            texts.extend(t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True))
        return texts


def load_variant(path: str, kind: Kind, threads: int, device: str = "cpu", language: str = "fr",
                 task: str = "transcribe") -> Transcriber:
    """A PyTorch model directory (or Hub id / fixture) or an ONNX export directory, ready to transcribe."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if kind == "pytorch":
        torch.set_num_threads(threads)
        model = load_model(path).to(device).eval()
        return Transcriber("pytorch", path, model, load_processor(path), device, language, task)
    if kind == "onnx":
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForSpeechSeq2Seq
        from transformers import WhisperProcessor

        if not any(Path(path).glob("encoder_model*.onnx")):
            raise FileNotFoundError(f"{path}: no encoder_model*.onnx here; expected an ONNX export from the convert step")
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        provider = "CUDAExecutionProvider" if device.startswith("cuda") else "CPUExecutionProvider"
        model = ORTModelForSpeechSeq2Seq.from_pretrained(path, provider=provider, session_options=so)
        return Transcriber("onnx", path, model, WhisperProcessor.from_pretrained(path), device, language, task)
    raise ValueError(f"unknown model kind {kind!r}: use 'pytorch' or 'onnx'")


__all__ = ["Transcriber", "load_variant", "resolve_model"]
