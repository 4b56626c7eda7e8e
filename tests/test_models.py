"""steps/models.py: fixture resolution, the CTranslate2 reader, tokenizer and generation config."""
from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from steps import models


def test_hub_ids_and_paths_pass_through(tmp_path):
    assert models.resolve_model("bofenghuang/whisper-large-v3-distil-fr-v0.2") == "bofenghuang/whisper-large-v3-distil-fr-v0.2"
    assert models.resolve_model(str(tmp_path)) == str(tmp_path)


def test_unknown_fixture_names_the_known_ones():
    with pytest.raises(ValueError, match="fixture:whisper-base"):
        models.resolve_model("fixture:nope")


def test_tiny_random_generates_french_prefix(tiny_model_dir):
    model = models.load_model("fixture:tiny-random")
    proc = models.load_processor("fixture:tiny-random")
    assert model.config.d_model == 64 and model.config.encoder_layers == 2 and model.config.vocab_size == len(proc.tokenizer)
    feats = proc(np.zeros(16000, np.float32), sampling_rate=16000, return_tensors="pt").input_features
    out = model.generate(feats, language="fr", task="transcribe", max_new_tokens=3)
    # transformers 4.57 returns only the generated tokens (the forced prefix is stripped)
    assert out.shape[0] == 1 and 1 <= out.shape[1] <= 3
    assert isinstance(proc.batch_decode(out, skip_special_tokens=True)[0], str)


def test_tiny_random_is_deterministic(tmp_path):
    models.build_tiny_random(tmp_path / "a")
    models.build_tiny_random(tmp_path / "b")
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tokenizer_and_generation_config_match_whisper_base(tiny_model_dir):
    from transformers import GenerationConfig

    tok = models.load_processor("fixture:tiny-random").tokenizer
    gen = GenerationConfig.from_pretrained(tiny_model_dir)
    ids = tok.convert_tokens_to_ids
    # ids of openai/whisper-base
    assert (ids("<|endoftext|>"), ids("<|startoftranscript|>"), ids("<|fr|>")) == (50257, 50258, 50265)
    assert (ids("<|transcribe|>"), ids("<|notimestamps|>"), ids("<|0.00|>"), len(tok)) == (50359, 50363, 50364, 51865)
    assert gen.decoder_start_token_id == 50258 and gen.no_timestamps_token_id == 50363
    assert gen.lang_to_id["<|fr|>"] == 50265 and len(gen.lang_to_id) == 99
    assert gen.task_to_id == {"translate": 50358, "transcribe": 50359}
    assert gen.begin_suppress_tokens == [220, 50257] and 50362 in gen.suppress_tokens
    labels = tok("Il fait beau.").input_ids
    assert labels[:4] == [50258, 50265, 50359, 50363] and labels[-1] == 50257
    assert tok.decode(labels, skip_special_tokens=True) == "Il fait beau."


def _ct2_bytes(variables: dict[str, np.ndarray], aliases=()) -> bytes:
    def s(x: str) -> bytes:
        b = x.encode() + b"\0"
        return struct.pack("<H", len(b)) + b

    codes = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.float16): 4}
    out = struct.pack("<I", 6) + s("WhisperSpec") + struct.pack("<II", 3, len(variables))
    for name, a in variables.items():
        out += s(name) + struct.pack("<B", a.ndim) + b"".join(struct.pack("<I", d) for d in a.shape)
        out += struct.pack("<BI", codes[a.dtype], a.nbytes) + a.tobytes()
    out += struct.pack("<I", len(aliases)) + b"".join(s(a) + s(t) for a, t in aliases)
    return out


def test_ct2_reader_dequantizes_and_resolves_aliases():
    w = np.array([[1, -2], [3, 4]], np.int8)
    scale = np.array([2.0, 4.0], np.float32)
    data = _ct2_bytes({"decoder/embeddings/weight": np.array([[0.5, 1.5]], np.float16),
                       "enc/w": w, "enc/w_scale": scale, "encoder/num_heads": np.array(8, np.int16)},
                      aliases=[("decoder/projection/weight", "decoder/embeddings/weight")])
    v = models.read_ct2_model(data)
    assert v["decoder/embeddings/weight"].dtype == np.float32
    np.testing.assert_array_equal(v["decoder/projection/weight"], [[0.5, 1.5]])
    np.testing.assert_allclose(v["enc/w"], [[0.5, -1.0], [0.75, 1.0]])
    assert "enc/w_scale" not in v and int(v["encoder/num_heads"]) == 8


def test_ct2_reader_refuses_other_specs():
    data = struct.pack("<I", 6) + struct.pack("<H", 12) + b"BartSpec\0xyz"
    with pytest.raises(ValueError, match="not a WhisperSpec"):
        models.read_ct2_model(data[:4] + struct.pack("<H", 9) + b"BartSpec\0" + struct.pack("<II", 1, 0))


def test_whisper_base_conversion_is_faithful():
    """Every converted tensor equals the CTranslate2 one (fused q/k/v split, k bias zero)."""
    path = models.resolve_model("fixture:whisper-base")
    from safetensors.torch import load_file

    sd = load_file(f"{path}/model.safetensors")
    f = models.ct2_files()
    v = models.read_ct2_model(f["part1"].read_bytes() + f["part2"].read_bytes())
    qkv = v["encoder/layer_3/self_attention/linear_0/weight"]
    assert torch.equal(sd["model.encoder.layers.3.self_attn.k_proj.weight"], torch.from_numpy(qkv[512:1024]))
    assert not np.any(v["encoder/layer_3/self_attention/linear_0/bias"][512:1024])  # k has no bias
    kv = v["decoder/layer_1/attention/linear_1/weight"]
    assert torch.equal(sd["model.decoder.layers.1.encoder_attn.v_proj.weight"], torch.from_numpy(kv[512:]))
    assert torch.equal(sd["model.encoder.conv2.weight"], torch.from_numpy(v["encoder/conv2/weight"]))
    n_params = sum(t.numel() for k, t in sd.items() if k != "proj_out.weight")
    assert 72e6 < n_params < 73e6  # whisper-base: 72.6M parameters



@pytest.mark.slow
def test_converted_base_matches_ctranslate2():
    """Same log-mel input -> same greedy tokens and encoder output as CTranslate2 on the shipped
    weights. ~1-2 min on 2 busy cores."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "verify_base_conversion.py"
    spec = importlib.util.spec_from_file_location("verify_base_conversion", path)
    verify = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(verify)
    clips = verify.test_clips(3)
    r = verify.same_features_check([c["array"] for c in clips], threads=2, max_new_tokens=32)
    assert r["same_tokens"] == 3 and r["encoder_max_abs_diff"] < 5e-3
