"""A random Whisper small enough to build per test (2+2 layers, d_model 64, 120 tokens), no processor."""
from __future__ import annotations

import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

ENC_LAYERS, DEC_LAYERS = 2, 2


def tiny_whisper(seed: int = 0) -> WhisperForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = WhisperConfig(vocab_size=120, num_mel_bins=80, d_model=64, encoder_layers=ENC_LAYERS,
                        decoder_layers=DEC_LAYERS, encoder_attention_heads=2, decoder_attention_heads=2,
                        encoder_ffn_dim=128, decoder_ffn_dim=128, max_source_positions=50,
                        max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                        decoder_start_token_id=1)
    return WhisperForConditionalGeneration(cfg).eval()
