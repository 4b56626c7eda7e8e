"""Hub upload against the offline hub (tests/hub_server.py) with the real huggingface_hub client,
and the model card: valid metadata, and every figure in it taken from the metrics given."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import subprocess
import sys
import tomllib
import traceback
from pathlib import Path
from typing import Optional

import pytest
import yaml
from huggingface_hub import HfApi
from huggingface_hub.errors import RepositoryNotFoundError
from huggingface_hub.repocard import metadata_load, model_index_to_eval_results
from hypothesis import HealthCheck, given, settings, strategies as st

from contract.config import load_config
from tasks.model_card import render_model_card, serving_requirements
from tasks.scorecard import NOT_MEASURED, variants
from tasks.upload import HubUploadError, UnsafeModelFolder, check_model_folder, push_model_folder
from hub_server import LFS_SIZE_THRESHOLD, hub_fixture, validate_card_metadata

REPO_ROOT = Path(__file__).resolve().parent.parent
WRITE, READ, BOB = (f"hf_{secrets.token_hex(12)}" for _ in range(3))
CARD = "---\nlicense: mit\nlanguage:\n- fr\n---\n\n# test model\n"


hub = hub_fixture({WRITE: ("alice", "write"), READ: ("alice", "read"), BOB: ("bob", "write")})


def write_graph(path: Path, data: Optional[str] = None, length: int = 4096, offset: int = 0) -> Path:
    """A real ONNX graph (Y = X + W, W of `length` bytes), W stored in the external file `data` (a
    location as written in the graph) when given, else inline; the data file itself is not written."""
    import onnx
    from onnx import TensorProto, helper

    n = length // 4
    w = helper.make_tensor("W", TensorProto.FLOAT, [n], [0.5] * n)
    if data is not None:
        w.ClearField("float_data")
        w.data_location = TensorProto.EXTERNAL
        for k, v in {"location": data, "offset": str(offset), "length": str(length)}.items():
            entry = w.external_data.add()
            entry.key, entry.value = k, v
    io = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n]) for x in ("X", "Y")]
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Add", ["X", "W"], ["Y"])], "g", io[:1], io[1:], [w])),
              str(path))
    return path


def make_model(root: Path, big: bool = False) -> Path:
    """A converted-model look-alike: json files, a small .onnx (LFS by pattern), optionally a graph whose
    external data is just over the Hub's 10 MB LFS threshold, in a file no pattern covers."""
    d = root / "qat_int8"
    d.mkdir(parents=True)
    (d / "config.json").write_text('{"model_type": "whisper"}')
    (d / "tokenizer.json").write_text('{"version": "1.0"}')
    write_graph(d / "encoder_model.onnx")
    if big:
        write_graph(d / "decoder_model.onnx", "decoder_model.onnx_data", LFS_SIZE_THRESHOLD + 4)
        (d / "decoder_model.onnx_data").write_bytes(os.urandom(LFS_SIZE_THRESHOLD + 4))
    return d


def test_upload_sends_every_file_and_large_ones_through_lfs(hub, tmp_path):
    model = make_model(tmp_path, big=True)
    out = push_model_folder(model, "alice/whisper-qat", WRITE, card=CARD, endpoint=hub.url)

    remote = hub.repo_files("alice/whisper-qat")
    local = sorted(p.name for p in model.iterdir())
    assert "README.md" not in local  # the card goes to the Hub, not into the step's recorded output folder
    assert out["uploaded"] is True and out["files"] == len(local) + 1 == 6
    assert out["url"] == f"{hub.url}/alice/whisper-qat"
    assert out["commit"] == hub.state.meta("alice/whisper-qat")["sha"]
    assert sorted(remote) == sorted(local + ["README.md", ".gitattributes"])
    for name in local:
        assert hub.file_bytes("alice/whisper-qat", name) == (model / name).read_bytes(), name
    lfs = {p for p, f in remote.items() if f["lfs"]}
    assert lfs == {"encoder_model.onnx", "decoder_model.onnx", "decoder_model.onnx_data"}
    assert remote["decoder_model.onnx_data"]["lfs"] == hashlib.sha256((model / "decoder_model.onnx_data").read_bytes()).hexdigest()
    assert sum(1 for m, p in hub.requests if m == "PUT" and p.startswith("/lfs-upload/")) == 3
    assert hub.file_bytes("alice/whisper-qat", "README.md").decode() == CARD
    assert WRITE not in repr(out)


def test_private_flag_is_honoured(hub, tmp_path):
    model = make_model(tmp_path)
    assert push_model_folder(model, "alice/secret", WRITE, private=True, card=CARD, endpoint=hub.url)["private"] is True
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url, token=False).model_info("alice/secret")
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url, token=BOB).model_info("alice/secret")
    assert HfApi(endpoint=hub.url, token=WRITE).model_info("alice/secret").private is True

    assert push_model_folder(model, "alice/open", WRITE, private=False, card=CARD, endpoint=hub.url)["private"] is False
    assert HfApi(endpoint=hub.url, token=False).model_info("alice/open").private is False
    # a public repo that the config wants private is made private before anything is pushed
    assert push_model_folder(model, "alice/open", WRITE, private=True, card=CARD, endpoint=hub.url)["private"] is True
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url, token=False).model_info("alice/open")


def test_reupload_to_an_existing_repo(hub, tmp_path):
    model = make_model(tmp_path)
    first = push_model_folder(model, "alice/m", WRITE, card=CARD, endpoint=hub.url)
    write_graph(model / "encoder_model.onnx", length=8192)  # a new version of the graph
    second = push_model_folder(model, "alice/m", WRITE, card=CARD + "\nv2\n", endpoint=hub.url)
    assert second["uploaded"] and second["commit"] != first["commit"]
    assert hub.file_bytes("alice/m", "encoder_model.onnx") == (model / "encoder_model.onnx").read_bytes()
    assert hub.file_bytes("alice/m", "README.md").decode().endswith("v2\n")
    # nothing changed: no commit, and it says since which commit
    third = push_model_folder(model, "alice/m", WRITE, card=CARD + "\nv2\n", endpoint=hub.url)
    assert third["uploaded"] is False and third["unchanged"] is True
    assert third["commit"] == second["commit"] == hub.state.meta("alice/m")["sha"]
    assert third["reason"].startswith(f"nothing new since the Hub commit {second['commit'][:12]}")
    assert [c["summary"] for c in hub.state.meta("alice/m")["commits"]][1:] == ["Upload qat_int8 with its model card"] * 2


def test_no_token_skips_without_contacting_the_hub(hub, tmp_path, caplog):
    model = make_model(tmp_path)
    with caplog.at_level(logging.WARNING):
        out = push_model_folder(model, "alice/m", None, card=CARD, endpoint=hub.url)
    assert out == {"uploaded": False, "reason": out["reason"], "path": model}
    assert "HF_TOKEN" in out["reason"] and "HF_TOKEN" in caplog.text
    assert hub.requests == []


def test_wrong_token_gives_a_clear_error_without_the_token(hub, tmp_path, caplog):
    model, bad = make_model(tmp_path), f"hf_{secrets.token_hex(16)}"
    with caplog.at_level(logging.DEBUG), pytest.raises(HubUploadError) as e:
        push_model_folder(model, "alice/m", bad, card=CARD, endpoint=hub.url)
    text = "".join(traceback.format_exception(e.value))
    assert "rejected" in str(e.value) and "401" in str(e.value) and "HF_TOKEN" in str(e.value)
    assert e.value.retryable is False and e.value.__cause__ is None and e.value.__context__ is None
    assert bad not in text and bad not in repr(e.value) and bad not in caplog.text
    assert hub.repo_files("alice/m") == {}


@pytest.mark.parametrize("token, repo, words", [
    (READ, "alice/m", "'read' role"),
    (BOB, "alice/m", "403"),
])
def test_token_without_write_rights_is_refused(hub, tmp_path, token, repo, words):
    with pytest.raises(HubUploadError) as e:
        push_model_folder(make_model(tmp_path), repo, token, card=CARD, endpoint=hub.url)
    assert words in str(e.value) and token not in str(e.value) and not e.value.retryable
    assert hub.repo_files(repo) == {}


def test_hub_refuses_a_broken_model_index(hub, tmp_path):
    card = "---\nmodel-index:\n- name: m\n  results:\n  - task: {type: automatic-speech-recognition}\n" \
           "    dataset: {name: x, type: x}\n    metrics:\n    - type: wer\n---\n"
    with pytest.raises(HubUploadError) as e:
        push_model_folder(make_model(tmp_path), "alice/m", WRITE, card=card, endpoint=hub.url)
    assert "metadata" in str(e.value) and "value" in str(e.value) and not e.value.retryable


def test_endpoint_comes_from_hf_endpoint_and_files_download_back(hub, tmp_path, monkeypatch):
    model = make_model(tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    out = push_model_folder(model, "alice/m", WRITE, card=CARD)
    assert out["url"] == f"{hub.url}/alice/m"
    # a fresh process that knows only HF_ENDPOINT and the token downloads what was uploaded
    code = ("import sys; from huggingface_hub import snapshot_download; "
            "print(snapshot_download('alice/m', cache_dir=sys.argv[1]))")
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": WRITE, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cache")], env=env, capture_output=True,
                         text=True, timeout=120, cwd=REPO_ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    snap = Path(res.stdout.strip().splitlines()[-1])
    for p in model.iterdir():
        assert (snap / p.name).read_bytes() == p.read_bytes(), p.name


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(HubUploadError, match="run the convert step"):
        push_model_folder(tmp_path / "nope", "alice/m", WRITE, card=CARD, endpoint="http://127.0.0.1:9")


# ---------------------------------------------------------------------------------------------
# What may go up: the export folder came from a rented machine, a stranger's computer

CONVERT_INT4 = ["added_tokens.json", "config.json", "decoder_model_merged.onnx", "decoder_model_merged.onnx_data",
                "encoder_model.onnx", "encoder_model.onnx_data", "generation_config.json", "merges.txt",
                "normalizer.json", "preprocessor_config.json", "special_tokens_map.json", "tokenizer.json",
                "tokenizer_config.json", "vocab.json"]


def test_every_file_convert_writes_is_allowed_and_uploaded(hub, tmp_path):
    d = tmp_path / "qat_int4"
    d.mkdir()
    for name in CONVERT_INT4:  # what steps/convert.py leaves in convert/qat_int4 (external data as <file>_data)
        if name.endswith(".onnx"):
            write_graph(d / name, next(n for n in CONVERT_INT4 if n.startswith(name) and n != name), 512)
        else:
            (d / name).write_bytes(b'{"model_type": "whisper"}' if name.endswith(".json") else os.urandom(512))
    (d / "README.md").write_text("# the machine's own card\n")
    assert check_model_folder(d) == CONVERT_INT4
    out = push_model_folder(d, "alice/m", WRITE, card=CARD, endpoint=hub.url)
    assert out["files"] == len(CONVERT_INT4) + 1
    assert sorted(hub.repo_files("alice/m")) == sorted(CONVERT_INT4 + ["README.md", ".gitattributes"])
    assert hub.file_bytes("alice/m", "README.md").decode() == CARD


def _symlink(d):
    (d / "vocab.json").symlink_to("/etc/passwd")


def _refused_whole(hub, tmp_path, plant, named: str, why: str):
    """A model folder with `plant` applied: the upload is refused naming the file and why, nothing sent."""
    model = make_model(tmp_path)
    plant(model)
    with pytest.raises(UnsafeModelFolder) as e:
        push_model_folder(model, "alice/m", WRITE, card=CARD, endpoint=hub.url)
    assert repr(named) in str(e.value) and why in str(e.value) and "nothing was sent" in str(e.value)
    assert hub.requests == [] and hub.repo_files("alice/m") == {}
    return model, e.value


@pytest.mark.parametrize("plant, named, why", [
    (lambda d: (d / "modeling_whisper.py").write_text("import os; os.system('x')"), "modeling_whisper.py", "code"),
    (lambda d: (d / "kernel.so").write_bytes(b"\x7fELF"), "kernel.so", "code"),
    (lambda d: (d / "pytorch_model.bin").write_bytes(b"\x80\x04."), "pytorch_model.bin", "pickle"),
    (lambda d: (d / "model.pt").write_bytes(b"\x80\x04."), "model.pt", "pickle"),
    (lambda d: (d / "x.pkl").write_bytes(b"\x80\x04."), "x.pkl", "pickle"),
    (lambda d: (d / "optimizer.ckpt").write_bytes(b"\x80\x04."), "optimizer.ckpt", "pickle"),
    (_symlink, "vocab.json", "symlink"),
    (lambda d: (d / "encoder_model.onnx").unlink() or (d / "encoder_model.onnx").symlink_to(d / "config.json"),
     "encoder_model.onnx", "symlink"),
    (lambda d: (d / "config.json").write_text('{"model_type": "whisper", "auto_map": {"AutoModel": "m.M"}}'),
     "config.json", "auto_map"),
    (lambda d: (d / "tokenizer_config.json").write_text('{"a": {"b": [{"auto_map": 1}]}}'), "tokenizer_config.json",
     "auto_map"),
    (lambda d: (d / "config.json").write_text('{"custom_pipelines": {}}'), "config.json", "custom_pipelines"),
    (lambda d: (d / "config.json").write_text('{"model_type": "whisper"'), "config.json", "not valid JSON"),
    (lambda d: (d / "notes.txt").write_text("hi"), "notes.txt", "not an expected export file"),
    (lambda d: (d / ".gitattributes").write_text("*.py filter=lfs"), ".gitattributes", "not an expected export file"),
    (lambda d: (d / "sub").mkdir() or (d / "sub" / "x.onnx").write_bytes(b"x"), "sub", "folder"),
    (lambda d: os.mkfifo(d / "pipe.onnx"), "pipe.onnx", "not a regular file"),
])
def test_unsafe_folders_are_refused_whole_naming_the_files(hub, tmp_path, plant, named, why):
    model, err = _refused_whole(hub, tmp_path, plant, named, why)
    assert err.retryable is False and isinstance(err, HubUploadError)
    assert not (model / "README.md").exists() or (model / "README.md").is_symlink()  # the card was not written either


def _graph_with_data(location: str, data_name: Optional[str] = None, size: int = 4096, **kw):
    def plant(d):
        write_graph(d / "decoder_model.onnx", location, 4096, **kw)
        if data_name:
            (d / data_name).write_bytes(os.urandom(size))
    return plant


@pytest.mark.parametrize("plant, named, why", [  # issue 19 finding 10: names alone said yes to each of these
    (_graph_with_data("../../x"), "decoder_model.onnx", "not an external data file of this folder"),
    (_graph_with_data("/etc/passwd"), "decoder_model.onnx", "not an external data file of this folder"),
    (_graph_with_data("sub/decoder_model.onnx_data"), "decoder_model.onnx", "not an external data file"),
    (_graph_with_data("config.json"), "decoder_model.onnx", "not an external data file of this folder"),
    (_graph_with_data("decoder_model.onnx_data"), "decoder_model.onnx", "not an external data file"),  # absent
    (_graph_with_data("decoder_model.onnx_data", "decoder_model.onnx_data", size=100), "decoder_model.onnx",
     "lies outside"),
    (_graph_with_data("decoder_model.onnx_data", "decoder_model.onnx_data", offset=10), "decoder_model.onnx",
     "lies outside"),
    (lambda d: write_graph(d / "evil.py.onnx"), "evil.py.onnx", "not an expected export file"),
    (lambda d: (d / "encoder_model.onnx_data").write_bytes(b"\x80\x04\x95" + os.urandom(64)), "encoder_model.onnx_data",
     "no ONNX graph of the folder references"),
    (lambda d: (d / "encoder_model.onnx").write_bytes(b"\x80\x04\x95cposix\nsystem\n."), "encoder_model.onnx",
     "not an ONNX model"),
    (lambda d: (d / "decoder_model.onnx").write_bytes(b""), "decoder_model.onnx", "not an ONNX model"),
])
def test_onnx_files_are_checked_by_content_not_by_name(hub, tmp_path, plant, named, why):
    _refused_whole(hub, tmp_path, plant, named, why)


def test_both_external_data_names_pass_when_referenced(tmp_path):
    """convert writes `<graph>.onnx_data` (optimum's Hub loader name) or `<graph>.onnx.data`: both go up
    when a graph of the folder references them."""
    model = make_model(tmp_path)
    for graph, data in (("decoder_model.onnx", "decoder_model.onnx_data"),
                        ("decoder_with_past_model.onnx", "decoder_with_past_model.onnx.data")):
        write_graph(model / graph, data, 4096)
        (model / data).write_bytes(os.urandom(4096))
    assert check_model_folder(model) == sorted(p.name for p in model.iterdir())


def test_a_symlinked_readme_is_refused_and_not_written_through(hub, tmp_path):
    model, target = make_model(tmp_path), tmp_path / "outside.txt"
    target.write_text("keep me")
    (model / "README.md").symlink_to(target)
    with pytest.raises(UnsafeModelFolder, match="symlink"):
        push_model_folder(model, "alice/m", WRITE, card=CARD, endpoint=hub.url)
    assert target.read_text() == "keep me" and hub.requests == []


def test_a_symlinked_model_folder_is_refused(hub, tmp_path):
    real = make_model(tmp_path / "real")
    link = tmp_path / "qat_int8"
    link.symlink_to(real)
    with pytest.raises(UnsafeModelFolder, match="symlink"):
        push_model_folder(link, "alice/m", WRITE, card=CARD, endpoint=hub.url)
    assert hub.requests == []


def test_refusal_comes_before_the_token_check(tmp_path):
    model = make_model(tmp_path)
    (model / "evil.py").write_text("")
    with pytest.raises(UnsafeModelFolder, match="evil.py"):
        push_model_folder(model, "alice/m", None, card=CARD, endpoint="http://127.0.0.1:9")


# ---------------------------------------------------------------------------------------------
# Model card

def full_metrics(scheme: str, draw=lambda: round(1 + secrets.randbelow(9_000_000) / 1e5, 5)) -> dict:
    names = [v for v, _ in variants(scheme)]
    wer = {v: draw() for v in names}
    return {
        "evaluate": {"wer": wer, "cer": {v: draw() for v in names},
                     "wer_ci": {v: [max(0.0, wer[v] - 1.25), wer[v] + 1.5] for v in names},
                     "n_utterances": 500,
                     "gate": {"passed": True, "qat_wer": wer[f"qat_{scheme}"], "qat_fp32_wer": wer["qat_fp32"],
                              "ptq_wer": wer[f"base_ptq_{scheme}"], "max_wer_degradation": 0.5,
                              "reasons": [f"qat_{scheme} WER {wer[f'qat_{scheme}']:.2f} > qat_fp32 WER "
                                          f"{wer['qat_fp32']:.2f} + 0.5"]}},
        # as steps/bench.py reports them: per device, one dict per measure, variant -> value (None: not measured)
        "bench": {"devices": {"cpu": {"latency_s": {v: draw() for v in names},
                                      "size_mb": {**{v: draw() for v in names}, "qat_fp32": None}}}},
        "train": {"steps": 1234, "final_train_loss": draw(), "dev_wer": draw(), "fake_quant_modules": 96},
    }


def table(card: str) -> dict[str, list[str]]:
    """Results table rows by variant label: the cells after the label."""
    rows = [ln for ln in card.splitlines() if ln.startswith("| ") and not ln.startswith("| variant")]
    return {r.split(" | ")[0][2:]: [c.strip() for c in r.strip(" |").split(" | ")[1:]] for r in rows}


def numbers_in(x) -> list:
    if isinstance(x, dict):
        return [n for v in x.values() for n in numbers_in(v)]
    if isinstance(x, (list, tuple)):
        return [n for v in x for n in numbers_in(v)]
    return [x] if isinstance(x, (int, float)) and not isinstance(x, bool) else []


def allowed_numbers(cfg, metrics: dict) -> set[str]:
    """Every rendering of every number the card may show: metrics, ratios of measured latencies, config."""
    values = numbers_in(metrics)
    lat = metrics.get("bench", {}).get("devices", {}).get("cpu", {}).get("latency_s", {})
    values += [lat[ref] / v for ref in ("base_fp32", "qat_fp32") for v in lat.values() if ref in lat and v]
    out = {f"{v:{spec}}" for v in values for spec in (".1f", ".2f", ".3f", ".4g", "g")} | {str(round(v, 2)) for v in values}
    out |= {s for v in numbers_in(cfg.model_dump()) for s in (f"{v:g}", str(v))}
    out |= {n for r in serving_requirements() for n in NUMBER.findall(r)}  # the install line's pins
    return out | {"95"}  # the confidence level of the bootstrap interval, a label


NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e[-+]?\d+)?(?=x?(?:[^\w.]|\.(?!\d)|$))")


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scheme=st.sampled_from(["int8", "int4"]), seed=st.integers(0, 2**32 - 1), drop=st.sets(st.sampled_from(
    ["wer", "cer", "wer_ci", "latency_s", "size_mb", "gate", "train"])))
def test_every_number_in_the_card_comes_from_the_metrics(scheme, seed, drop):
    import random

    rng = random.Random(seed)
    cfg = load_config(scheme)
    metrics = full_metrics(scheme, draw=lambda: round(rng.uniform(0.5, 900.0), rng.choice([1, 3, 5])))
    for section in [*metrics.values(), metrics["bench"]["devices"]["cpu"]]:
        for key in drop & set(section):
            del section[key]
    if "train" in drop:
        metrics["train"] = {}
    card = render_model_card(cfg, metrics)

    stray = [n for n in NUMBER.findall(card) if n not in allowed_numbers(cfg, metrics)]
    assert stray == [], f"numbers in the card that no metric or config holds: {stray}"
    rows, ev, be = table(card), metrics["evaluate"], metrics["bench"]["devices"]["cpu"]
    for name, label in variants(scheme):
        wer, ci, cer, size, lat, speed = rows[label]
        assert wer == (f"{ev['wer'][name]:.2f}" if "wer" in ev else NOT_MEASURED)
        assert cer == (f"{ev['cer'][name]:.2f}" if "cer" in ev else NOT_MEASURED)
        assert ci == (f"{ev['wer_ci'][name][0]:.2f} to {ev['wer_ci'][name][1]:.2f}" if "wer_ci" in ev else NOT_MEASURED)
        measured = (be.get("size_mb") or {}).get(name)
        assert size == (f"{measured:.1f}" if measured is not None else NOT_MEASURED)
        assert lat == (f"{be['latency_s'][name]:.3f}" if "latency_s" in be else NOT_MEASURED)
        assert speed == (f"{be['latency_s']['base_fp32'] / be['latency_s'][name]:.2f}x" if "latency_s" in be else NOT_MEASURED)
    assert ("Quality gate **passed**" in card) == ("gate" in ev)


def test_card_with_no_metrics_says_not_measured():
    cfg = load_config("demo")
    card = render_model_card(cfg, {})
    assert all(cells == [NOT_MEASURED] * 6 for cells in table(card).values()) and len(table(card)) == 4
    assert "Quality gate: not measured" in card
    meta = metadata_load_text(card)
    assert "model-index" not in meta and "base_model" not in meta  # a fixture is no Hub id
    assert validate_card_metadata(card) == []


def metadata_load_text(card: str) -> dict:
    return yaml.safe_load(card.split("---\n")[1])


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_card_metadata_is_valid_and_holds_the_measured_test_scores(scheme, tmp_path):
    cfg = load_config(scheme)
    metrics = full_metrics(scheme)
    metrics["evaluate"]["gate"]["passed"] = False
    card = render_model_card(cfg, metrics)
    (tmp_path / "README.md").write_text(card)
    meta = metadata_load(tmp_path / "README.md")
    assert validate_card_metadata(card) == []
    assert meta["license"] == cfg.hub.license and meta["language"] == ["fr"]
    assert meta["base_model"] == "bofenghuang/whisper-large-v3-distil-fr-v0.2"
    assert meta["pipeline_tag"] == "automatic-speech-recognition"
    assert {"whisper", "onnx", scheme, "qat"} <= set(meta["tags"])
    name, results = model_index_to_eval_results(meta["model-index"])
    assert name == cfg.hub.repo_id.split("/")[1]
    got = {r.metric_type: r.metric_value for r in results}
    ev = metrics["evaluate"]
    assert got == {"wer": round(ev["wer"][f"qat_{scheme}"], 2), "cer": round(ev["cer"][f"qat_{scheme}"], 2)}
    assert {(r.dataset_type, r.dataset_config, r.dataset_split) for r in results} == {
        ("facebook/multilingual_librispeech", "french", "test")}
    assert "Quality gate **FAILED**" in card and metrics["evaluate"]["gate"]["reasons"][0] in card
    assert f'ORTModelForSpeechSeq2Seq.from_pretrained("{cfg.hub.repo_id}")' in card
    assert 'generate(inputs.input_features, language="fr", task="transcribe")' in card
    if scheme == "int4":
        assert "blocks of 32" in card


@pytest.mark.slow
def test_uploaded_model_loads_with_the_cards_own_instructions(hub, tmp_path, tiny_model_dir, french_manifest):
    """Export the tiny Whisper to ONNX, upload it with its card, then run the card's Python snippet
    in a fresh process that knows only HF_ENDPOINT and HF_TOKEN (the repo is private)."""
    from optimum.onnxruntime import ORTModelForSpeechSeq2Seq
    from transformers import AutoProcessor

    model = tmp_path / "qat_int8"
    ORTModelForSpeechSeq2Seq.from_pretrained(tiny_model_dir, export=True).save_pretrained(model)
    AutoProcessor.from_pretrained(tiny_model_dir).save_pretrained(model)
    gen = json.loads((model / "generation_config.json").read_text())  # a random model talks until the
    (model / "generation_config.json").write_text(json.dumps({**gen, "max_length": 12}))  # limit: keep it short
    cfg = load_config("tiny", {"hub.repo_id": "alice/tiny-qat"})
    card = render_model_card(cfg, {})
    out = push_model_folder(model, "alice/tiny-qat", WRITE, card=card, endpoint=hub.url)
    assert out["private"] and {"encoder_model.onnx", "decoder_model.onnx"} <= set(hub.repo_files("alice/tiny-qat"))

    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    prelude = ("import sys, numpy as np, soundfile as sf\n"
               "audio, sr = sf.read(sys.argv[1], dtype='float32')\n"
               "audio = audio if audio.ndim == 1 else audio.mean(axis=1)\n"
               "if sr != 16000:\n"
               "    audio = np.interp(np.arange(0, len(audio), sr / 16000), np.arange(len(audio)), audio).astype('float32')\n")
    clip = REPO_ROOT / french_manifest[0]["audio"]
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": WRITE, "HF_HOME": str(tmp_path / "hf-home"),
           "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}
    res = subprocess.run([sys.executable, "-c", prelude + snippet, str(clip)], env=env, capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().startswith("['"), res.stdout[-500:]
    assert any(p == "/alice/tiny-qat/resolve/main/encoder_model.onnx" for _, p in hub.requests)


def test_card_tells_users_which_packages_load_the_model():
    """The card's install line pins what its snippet imports as pyproject.toml pins it (the int4 encoder is
    ONNX opset 21, which an older onnxruntime cannot load), and this environment satisfies those pins."""
    from importlib.metadata import version

    from packaging.requirements import Requirement

    card = render_model_card(load_config("int4"), {})
    line = next(x for x in card.splitlines() if x.startswith("Install: "))
    pins = [Requirement(r) for r in re.findall(r'"([^"]+)"', line)]
    assert [r.name for r in pins] == ["optimum-onnx", "onnxruntime"], line
    assert {str(r) for r in pins} == set(serving_requirements())
    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert {str(r) for r in pins} <= {str(Requirement(d)) for d in deps}
    assert all(r.specifier.contains(version(r.name), prereleases=True) for r in pins), line
    assert line.index("Install") < card.index("```python")


def test_card_takes_sizes_from_convert_when_bench_did_not_measure_them():
    cfg = load_config("int4")
    card = render_model_card(cfg, {"convert": {"sizes_mb": {"qat_int4": 123.456, "base_fp32": 987.65}},
                                   "bench": {"devices": {"cpu": {"size_mb": {"qat_int4": None, "base_fp32": 990.04}}}}})
    rows = table(card)
    assert rows["**QAT int4 (this model)**"][3] == "123.5" and rows["baseline (fp32, PyTorch)"][3] == "990.0"
    assert rows["QAT-trained model, fp32 (PyTorch)"][3] == NOT_MEASURED


def test_card_gives_pytorch_the_safetensors_size_not_the_onnx_exports():
    """convert records its ONNX fp32 exports under the model names (qat_fp32, base_fp32) and the
    PyTorch weights as pytorch_fp32; bench names variants. Both PyTorch rows show the safetensors size."""
    cfg = load_config("int8")
    convert = {"sizes_mb": {"qat_fp32": 397.0, "base_fp32": 397.04, "qat_int8": 110.2, "base_ptq_int8": 110.3,
                            "pytorch_fp32": 290.4}}
    bench = {"size_mb": {"qat_fp32": 290.41, "qat_onnx_fp32": 397.0, "base_onnx_fp32": 397.04, "qat_int8": 110.2,
                         "base_ptq_int8": 110.3}}
    rows = table(render_model_card(cfg, {"convert": convert, "bench": {"devices": {"cpu": bench}}}))
    assert rows["baseline (fp32, PyTorch)"][3] == rows["QAT-trained model, fp32 (PyTorch)"][3] == "290.4"
    assert rows["**QAT int8 (this model)**"][3] == "110.2" and rows["PTQ int8 (baseline quantized, no QAT)"][3] == "110.3"
    # before bench ran: convert's own record of the safetensors
    rows = table(render_model_card(cfg, {"convert": convert}))
    assert rows["baseline (fp32, PyTorch)"][3] == rows["QAT-trained model, fp32 (PyTorch)"][3] == "290.4"


def test_card_links_a_hub_model_to_its_parent_and_its_data():
    meta = metadata_load_text(render_model_card(load_config("int8"), {}))
    assert meta["base_model"] == "bofenghuang/whisper-large-v3-distil-fr-v0.2"
    assert meta["datasets"] == ["facebook/multilingual_librispeech"]
    local = metadata_load_text(render_model_card(load_config("demo"), {}))  # a fixture and a local manifest
    assert "base_model" not in local and "datasets" not in local
