"""One transcription API over PyTorch and ONNX Runtime models, used by evaluate and bench.

    t = load_variant("work/convert/qat_int8", "onnx", threads=2)
    texts = t.transcribe([audio_16k_float32, ...], max_new_tokens=128)

Decoding is fixed: greedy, language and task forced (French transcription by default), with
Whisper's suppressed tokens applied through masks built once (see SuppressTokens).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from .models import load_model, load_processor, resolve_model

Kind = Literal["pytorch", "onnx"]
SAMPLE_RATE = 16000


class SuppressTokens(LogitsProcessor):
    """Whisper's ``suppress_tokens`` (every step) and ``begin_suppress_tokens`` (first generated
    step) with each vocabulary mask built once per vocabulary size and device.

    transformers' own processors rebuild both masks with ``torch.isin`` over the whole vocabulary
    at every step, a cost every variant pays per token and a large share of a quantized decoder
    step on a CPU. The tokens that come out are the same.
    """

    def __init__(self, always: Sequence[int], at_begin: Sequence[int]):
        self.always, self.at_begin = list(always), list(at_begin)
        self.begin_index: int | None = None
        self._masks: dict = {}

    def set_begin_index(self, begin_index: int) -> None:  # called by Whisper's generate()
        self.begin_index = begin_index

    def _mask(self, which: str, scores: torch.Tensor) -> torch.Tensor:
        key = (which, scores.shape[-1], scores.device)
        if key not in self._masks:
            vocab = scores.shape[-1]
            mask = torch.zeros(vocab, dtype=torch.bool, device=scores.device)
            mask[[i for i in getattr(self, which) if 0 <= i < vocab]] = True
            self._masks[key] = mask
        return self._masks[key]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.always:
            scores = scores.masked_fill(self._mask("always", scores), -float("inf"))
        if self.at_begin and input_ids.shape[-1] == self.begin_index:
            scores = scores.masked_fill(self._mask("at_begin", scores), -float("inf"))
        return scores


@dataclass
class Transcriber:
    kind: str
    path: str
    model: Any
    processor: Any
    device: str = "cpu"
    language: str = "fr"
    task: str = "transcribe"
    suppress: SuppressTokens = field(init=False)

    def __post_init__(self):
        # the model's suppressed tokens move to one SuppressTokens; left in the generation config,
        # generate() would also rebuild them every step (a None passed to generate() means "default")
        gc = self.model.generation_config
        self.suppress = SuppressTokens(gc.suppress_tokens or [], gc.begin_suppress_tokens or [])
        gc.suppress_tokens = gc.begin_suppress_tokens = None

    def features(self, audios: Sequence[np.ndarray]) -> torch.Tensor:
        """Log-mel input features (batch, n_mels, 3000) as float32 on the model's device."""
        arrays = [np.asarray(a, dtype=np.float32) for a in audios]
        feats = self.processor.feature_extractor(arrays, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
        return feats.to(self.device, dtype=torch.float32 if self.kind == "onnx" else self.model.dtype)

    @torch.inference_mode()
    def generate_ids(self, input_features: torch.Tensor | None, max_new_tokens: int = 128, **kwargs) -> torch.Tensor:
        """Greedy token ids (the forced prefix is not included); kwargs go to generate()
        (for instance ``encoder_outputs`` with ``input_features=None``)."""
        return self.model.generate(input_features=input_features, language=self.language, task=self.task,
                                   max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                   return_timestamps=False, logits_processor=LogitsProcessorList([self.suppress]),
                                   **kwargs)

    def transcribe(self, audios: Sequence[np.ndarray], max_new_tokens: int = 128, batch_size: int = 8) -> list[str]:
        """Transcripts of 16 kHz mono float32 clips (each up to 30 s), in order."""
        texts: list[str] = []
        for start in range(0, len(audios), batch_size):
            ids = self.generate_ids(self.features(audios[start:start + batch_size]), max_new_tokens)
            texts.extend(t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True))
        return texts


def load_variant(path: str, kind: Kind, threads: int, device: str = "cpu", language: str = "fr",
                 task: str = "transcribe", revision: Optional[str] = None) -> Transcriber:
    """A PyTorch model directory (or Hub id at `revision` / fixture) or an ONNX export directory, ready to transcribe."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if kind == "pytorch":
        torch.set_num_threads(threads)
        model = load_model(path, revision=revision).to(device).eval()
        return Transcriber("pytorch", path, model, load_processor(path, revision), device, language, task)
    if kind == "onnx":
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForSpeechSeq2Seq
        from transformers import WhisperProcessor

        if not any(Path(path).glob("encoder_model*.onnx")):
            raise FileNotFoundError(f"{path}: no encoder_model*.onnx here; expected an ONNX export from the convert step")
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        # no busy-waiting after a run: generate() does Python work between decoder calls, and
        # spinning ORT threads take the cores from it (on 2 cores a clip is markedly slower with spinning)
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        provider = "CUDAExecutionProvider" if device.startswith("cuda") else "CPUExecutionProvider"
        model = ORTModelForSpeechSeq2Seq.from_pretrained(path, provider=provider, session_options=so)
        return Transcriber("onnx", path, model, WhisperProcessor.from_pretrained(path), device, language, task)
    raise ValueError(f"unknown model kind {kind!r}: use 'pytorch' or 'onnx'")


__all__ = ["SuppressTokens", "Transcriber", "load_variant", "resolve_model"]
