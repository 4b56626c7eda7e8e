"""A run's end at home against the test Hub, for the upload tests (test_untrusted, test_champion): the
config, the Hub with a write token, an evaluate result.json claiming WERs, the export folder."""
from __future__ import annotations

import json
import secrets

import pytest

import tasks.gate
import tasks.upload
from contract.config import load_config
from hub_server import hub_fixture
from task_loggers import plain_loggers_for
from steps import evaluate
from utterance_csv import counts, home_manifest

WRITE = f"hf_{secrets.token_hex(12)}"
REPO = "alice/whisper-qat"


@pytest.fixture
def cfg(tmp_path):
    return load_config("tiny", {"hub.repo_id": REPO, "eval.max_wer_degradation": 1.0, **home_manifest(tmp_path / "home")})


plain_loggers = plain_loggers_for(tasks.gate, tasks.upload)
hub = hub_fixture({WRITE: ("alice", "write")}, env_token=WRITE)  # HF_ENDPOINT and HF_TOKEN point at it


def claim(cfg, wer: dict[str, float], **gate_overrides) -> dict:
    """An evaluate result.json as the step writes it, for these claimed WERs."""
    gate = evaluate.gate(cfg, counts(wer))
    return {"step": "evaluate", "status": "ok", "metrics": {
        "wer": dict(wer), "cer": {v: 1.0 for v in wer}, "n_utterances": 10, "gate": {**gate, **gate_overrides}}}


def export_dir(work):
    """convert/qat_int8 as steps/convert.py leaves it (names, JSON and two trivial ONNX graphs)."""
    import onnx
    from onnx import TensorProto, helper

    d = work / "convert" / "qat_int8"
    d.mkdir(parents=True)
    for name in ("config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json"):
        (d / name).write_text(json.dumps({"model_type": "whisper"}))
    (d / "merges.txt").write_text("#version: 0.2\nh e\n")
    for name in ("encoder_model.onnx", "decoder_model_merged.onnx"):  # real graphs: the upload parses each
        io = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1]) for x in ("X", "Y")]
        onnx.save(helper.make_model(helper.make_graph([helper.make_node("Identity", ["X"], ["Y"])], "g", io[:1], io[1:])),
                  str(d / name))
    return d
