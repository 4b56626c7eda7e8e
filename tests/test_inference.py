"""steps/inference.py: the decoding loop every variant shares."""
from __future__ import annotations

from pathlib import Path

import soundfile as sf
import torch
from transformers.generation.logits_process import (SuppressTokensAtBeginLogitsProcessor,
                                                    SuppressTokensLogitsProcessor)

from steps.inference import SuppressTokens, load_variant

REPO = Path(__file__).resolve().parent.parent


def test_suppress_tokens_masks_what_transformers_masks():
    always, at_begin = [1, 7, 50, 99], [3, 50]
    ours = SuppressTokens(always, at_begin)
    ours.set_begin_index(4)
    ref_always = SuppressTokensLogitsProcessor(always)
    ref_begin = SuppressTokensAtBeginLogitsProcessor(at_begin, begin_index=4)
    scores = torch.randn(2, 100)
    for length in (4, 5, 9):  # the first generated step, then later ones
        ids = torch.zeros(2, length, dtype=torch.long)
        expected = ref_always(ids, ref_begin(ids, scores.clone()))
        assert torch.equal(ours(ids, scores.clone()), expected), length
    assert torch.isinf(ours(torch.zeros(2, 4, dtype=torch.long), scores)[:, 3]).all()
    assert not torch.isinf(ours(torch.zeros(2, 5, dtype=torch.long), scores)[:, 3]).any()


def test_generation_suppresses_like_transformers(tiny_model_dir, tiny_onnx_dir, french_manifest):
    """The tiny model's favourite tokens are suppressed: PyTorch and ONNX give transformers' ids
    (batched and one clip) and never the suppressed ones."""
    rows = [r for r in french_manifest if r["split"] == "test"][:3]
    audios = [sf.read(REPO / r["audio"], dtype="float32")[0] for r in rows]
    for path, kind in ((tiny_model_dir, "pytorch"), (tiny_onnx_dir, "onnx")):
        t = load_variant(str(path), kind, threads=2)
        feats = t.features(audios)
        assert len(t.suppress.always) > 10 and t.suppress.at_begin  # the model's lists, moved
        favourite = t.generate_ids(feats, max_new_tokens=8)
        banned = sorted({int(x) for x in favourite[:, 0]} | {int(x) for x in favourite[:, 1]})
        t.suppress = SuppressTokens(t.suppress.always + banned[1:], t.suppress.at_begin + banned[:1])
        for f in (feats, feats[:1]):
            ours = t.generate_ids(f, max_new_tokens=8)
            with torch.inference_mode():  # transformers' own processors, rebuilt every step
                theirs = t.model.generate(input_features=f, language="fr", task="transcribe",
                                          max_new_tokens=8, do_sample=False, num_beams=1,
                                          suppress_tokens=t.suppress.always, begin_suppress_tokens=t.suppress.at_begin)
            assert ours.tolist() == theirs.tolist(), kind
            assert not set(ours.flatten().tolist()) & set(banned[1:]), kind
            assert banned[0] not in ours[:, 0].tolist(), kind
