"""A converted model with external data loads from the Hub by repo id, as the model card tells users.

At real size the encoder has external data, and ONNX Runtime's quantizers name it
`encoder_model.onnx.data`; optimum's Hub loader downloads only `<file>_data`. whisper-base and the tiny
fixture are too small for external data, so optimum's own FORCE_ONNX_EXTERNAL_DATA makes the export
write it (as it does for a 3 GB model); int4 always has it. The export goes through the convert step's
functions, the upload through `push_model_folder` to the test Hub (tests/hub_server.py), and the load
runs the card's snippet in a fresh process that knows only HF_ENDPOINT and HF_TOKEN.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx.external_data_helper import _get_all_tensors, uses_external_data

from contract.config import load_config
from contract.quant_spec import QuantSpec
from steps import convert
from tasks.model_card import render_model_card
from tasks.upload import push_model_folder
from hub_server import hub_fixture

REPO_ROOT = Path(__file__).resolve().parent.parent
WRITE = f"hf_{secrets.token_hex(12)}"


hub = hub_fixture({WRITE: ("alice", "write")})


def external_locations(model_dir: Path) -> dict[str, set[str]]:
    """{graph file: the external data files its tensors point at}."""
    out = {}
    for g in sorted(model_dir.glob("*.onnx")):
        model = onnx.load(str(g), load_external_data=False)
        out[g.name] = {e.value for t in _get_all_tensors(model) if uses_external_data(t)
                       for e in t.external_data if e.key == "location"}
    return out


@pytest.fixture(scope="module", params=[("int8", True), ("int4", False)], ids=["int8-forced", "int4"])
def exported(request, tmp_path_factory, tiny_model_dir):
    """convert_model's output for the tiny Whisper: int8 with the fp32 export forced to external data
    (as at real size), int4 as it comes (its quantizer always writes external data)."""
    scheme, force = request.param
    out = tmp_path_factory.mktemp(f"hub-{scheme}")
    mp = pytest.MonkeyPatch()
    if force:
        mp.setenv("FORCE_ONNX_EXTERNAL_DATA", "1")
    try:
        convert.convert_model(Path(tiny_model_dir), out, "qat_fp32", f"qat_{scheme}", QuantSpec.of(scheme))
    finally:
        mp.undo()
    model = out / f"qat_{scheme}"
    gen = json.loads((model / "generation_config.json").read_text())  # a random model talks until the
    (model / "generation_config.json").write_text(json.dumps({**gen, "max_length": 12}))  # limit: keep it short
    return scheme, out


def test_every_variant_names_its_external_data_as_the_hub_loader_downloads(exported):
    scheme, out = exported
    assert external_locations(out / f"qat_{scheme}")["encoder_model.onnx"], "the test needs external data"
    for variant in ("qat_fp32", f"qat_{scheme}"):
        locations = external_locations(out / variant)
        for graph, files in locations.items():
            assert files <= {graph + "_data"}, f"{variant}/{graph} points at {files}"
        assert not list((out / variant).glob("*.onnx.data")), sorted(p.name for p in (out / variant).iterdir())


def test_external_data_is_renamed_and_the_graph_rewritten(tmp_path):
    """A graph whose tensors all live in `<file>.data` (ORT's quantizers' name) gets `<file>_data`."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    path = tmp_path / "encoder_model.onnx"
    onnx.save(helper.make_model(graph), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="encoder_model.onnx.data", size_threshold=0)
    assert convert.name_external_data(tmp_path) == {"encoder_model.onnx": "encoder_model.onnx_data"}
    assert external_locations(tmp_path) == {"encoder_model.onnx": {"encoder_model.onnx_data"}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder_model.onnx", "encoder_model.onnx_data"]
    np.testing.assert_array_equal(numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0]),
                                  numpy_helper.to_array(w))
    assert convert.name_external_data(tmp_path) == {}  # already named: nothing to do


def test_uploaded_export_with_external_data_loads_by_repo_id(exported, hub, tmp_path, french_manifest):
    scheme, out = exported
    repo = f"alice/tiny-qat-{scheme}"
    cfg = load_config("tiny", {"hub.repo_id": repo, "quant.scheme": scheme})
    card = render_model_card(cfg, {})
    push_model_folder(out / f"qat_{scheme}", repo, WRITE, card=card, endpoint=hub.url)

    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    prelude = ("import sys, numpy as np, soundfile as sf\n"
               "audio, sr = sf.read(sys.argv[1], dtype='float32')\n"
               "audio = audio if audio.ndim == 1 else audio.mean(axis=1)\n")
    clip = REPO_ROOT / next(r for r in french_manifest if r["split"] == "test")["audio"]
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": WRITE, "HF_HOME": str(tmp_path / "hf-home"),
           "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("FORCE_ONNX_EXTERNAL_DATA", None)
    res = subprocess.run([sys.executable, "-c", prelude + snippet, str(clip)], env=env, capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().startswith("['"), res.stdout[-500:]
    assert "encoder_model.onnx_data" in hub.repo_files(repo)
    assert ("GET", f"/{repo}/resolve/main/encoder_model.onnx_data") in hub.requests


@pytest.mark.parametrize("config, warned", [("int8", True), ("int4", True), ("tiny", False)])
def test_card_names_the_onnx_library_and_warns_when_the_base_model_saw_the_test_data(config, warned):
    card = render_model_card(load_config(config), {})
    meta = yaml.safe_load(re.match(r"^---\n(.*?)\n---", card, re.S).group(1))
    assert meta["library_name"] == "onnx"  # ONNX files only: "transformers" would offer a snippet that fails
    assert ("among its training data" in card) is warned
    if warned:
        assert "`facebook/multilingual_librispeech` among its training data" in card
