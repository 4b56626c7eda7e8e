"""Check the CTranslate2 -> transformers conversion of whisper-base against faster-whisper.

    .venv/bin/python -m scripts.verify_base_conversion [--clips N] [--threads 2] [--json out.json]

Transcribes the fixture test clips with the converted model (PyTorch, greedy) and with
faster-whisper on the same CTranslate2 weights (float32, greedy, no timestamps, no temperature
fallback), then reports per-clip agreement (faster-whisper computes its own log-mel features, so
near-chance outputs may differ; a second check feeds identical features to CTranslate2), each one's WER against the references, the WER of
one against the other, and the converted model's WER per espeak voice.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

from steps.evaluate import score
from steps.models import cache_dir, write_ct2_dir
from contract.normalize import normalize_french

REPO = Path(__file__).resolve().parent.parent


def test_clips(n: int | None = None) -> list[dict]:
    import soundfile as sf

    rows = [json.loads(line) for line in (REPO / "fixtures/french/manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    rows = [r for r in rows if r["split"] == "test"][:n]
    for r in rows:
        r["array"], sr = sf.read(REPO / r["audio"], dtype="float32")
        assert sr == 16000, r["audio"]
    return rows


def ct2_dir() -> Path:
    d = cache_dir() / "whisper-base-ct2"
    if not (d / "model.bin").is_file():
        write_ct2_dir(d.with_name(d.name + ".tmp")).rename(d)
    return d


def faster_whisper_transcribe(audios, threads: int, max_new_tokens: int = 128) -> list[str]:
    from faster_whisper import WhisperModel

    model = WhisperModel(str(ct2_dir()), device="cpu", compute_type="float32", cpu_threads=threads)
    texts = []
    for a in audios:
        segments, _ = model.transcribe(a, language="fr", task="transcribe", beam_size=1, temperature=[0.0],
                                       without_timestamps=True, condition_on_previous_text=False, vad_filter=False,
                                       max_new_tokens=max_new_tokens)
        texts.append(" ".join(s.text.strip() for s in segments).strip())
    return texts


def same_features_check(audios, threads: int, max_new_tokens: int = 128) -> dict:
    """Feed identical log-mel features to the converted model and to CTranslate2 (float32):
    encoder outputs must match and greedy token ids should be the same."""
    import ctranslate2
    import numpy as np
    import torch

    from steps.inference import load_variant

    t = load_variant("fixture:whisper-base", "pytorch", threads=threads)
    ct2 = ctranslate2.models.Whisper(str(ct2_dir()), device="cpu", compute_type="float32", intra_threads=threads)
    tok = t.processor.tokenizer
    prompt = tok.convert_tokens_to_ids(["<|startoftranscript|>", "<|fr|>", "<|transcribe|>", "<|notimestamps|>"])
    max_diff, same = 0.0, 0
    for a in audios:
        feats = t.features([a])
        with torch.inference_mode():
            enc_hf = t.model.model.encoder(feats).last_hidden_state.numpy()
        sv = ctranslate2.StorageView.from_array(np.ascontiguousarray(feats.numpy()))
        enc_ct2 = np.array(ct2.encode(sv, to_cpu=True))
        max_diff = max(max_diff, float(np.abs(enc_hf - enc_ct2).max()))
        hf_ids = t.generate_ids(feats, max_new_tokens)[0].tolist()
        # CTranslate2 4.8 counts max_length from the prompt start: see docs/REFERENCE.md section 3
        res = ct2.generate(sv, [prompt], beam_size=1, max_length=max_new_tokens + len(prompt), return_scores=False)
        ct2_ids = [i for i in res[0].sequences_ids[0] if i != tok.eos_token_id]
        hf_ids = [i for i in hf_ids if i not in prompt and i != tok.eos_token_id]
        same += hf_ids == ct2_ids
    return {"encoder_max_abs_diff": max_diff, "same_tokens": same, "clips": len(audios)}


def compare(n_clips: int | None = None, threads: int = 2) -> dict:
    from steps.inference import load_variant

    clips = test_clips(n_clips)
    audios = [c["array"] for c in clips]
    refs = [normalize_french(c["text"]) for c in clips]
    t0 = time.time()
    hf = load_variant("fixture:whisper-base", "pytorch", threads=threads).transcribe(audios, max_new_tokens=128)
    t1 = time.time()
    fw = faster_whisper_transcribe(audios, threads)
    t2 = time.time()
    same_feats = same_features_check(audios, threads)
    hf_n, fw_n = [normalize_french(t) for t in hf], [normalize_french(t) for t in fw]
    per_voice = defaultdict(list)
    for i, c in enumerate(clips):
        per_voice[c["speaker"]].append(i)
    s_hf = score(refs, hf_n)
    voices = {v: round(score([refs[i] for i in ix], [hf_n[i] for i in ix]).wer, 1) for v, ix in sorted(per_voice.items())}
    return {
        "clips": len(clips),
        "same_features": same_feats,
        "identical": sum(a == b for a, b in zip(hf_n, fw_n)),
        "wer_hf": round(s_hf.wer, 2), "wer_faster_whisper": round(score(refs, fw_n).wer, 2),
        "wer_hf_vs_faster_whisper": round(score(fw_n, hf_n).wer, 2),
        "wer_per_voice_hf": voices,
        "seconds": {"hf": round(t1 - t0, 1), "faster_whisper": round(t2 - t1, 1)},
        "per_clip": [{"id": c["id"], "reference": c["text"], "hf": h, "faster_whisper": f, "same": hn == fn}
                     for c, h, f, hn, fn in zip(clips, hf, fw, hf_n, fw_n)],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=None, help="first N test clips (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="write the full report here")
    args = ap.parse_args(argv)
    r = compare(args.clips, args.threads)
    for c in r["per_clip"]:
        mark = "==" if c["same"] else "!="
        print(f"{c['id']:<22} {mark} ref: {c['reference']}\n{'':<25} hf: {c['hf']}\n{'':<25} fw: {c['faster_whisper']}")
    print(f"\n{r['identical']}/{r['clips']} clips identical after normalization")
    print(f"WER converted (PyTorch): {r['wer_hf']} %   faster-whisper: {r['wer_faster_whisper']} %   "
          f"converted vs faster-whisper: {r['wer_hf_vs_faster_whisper']} %")
    print("WER per voice (converted):", r["wer_per_voice_hf"])
    sf_ = r["same_features"]
    print(f"same log-mel input: greedy tokens identical on {sf_['same_tokens']}/{sf_['clips']} clips, "
          f"encoder max |diff| {sf_['encoder_max_abs_diff']:.2e}")
    print("seconds:", r["seconds"])
    if args.json:
        args.json.write_text(json.dumps(r, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
