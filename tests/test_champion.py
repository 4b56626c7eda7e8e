"""Champion vs challenger (tasks/champion.py through tasks/upload.py's task) against the test Hub
server: a model worse than the published one on the same test utterances is not published; a
better one is, in its own commit whose message carries the run id, the revisions and the figures."""
from __future__ import annotations

import json

import pytest
from huggingface_hub import HfApi

from tasks.champion import EVAL_FILE
from tasks.gate import quality_gate
from tasks.scorecard import md_text
from tasks.upload import push_model_folder, upload_to_hub
from home_uploads import REPO, WRITE, claim, cfg, export_dir, hub, plain_loggers  # noqa: F401 - fixtures
from utterance_csv import write_evaluation

GOOD = {"base_fp32": 50.0, "qat_fp32": 20.0, "qat_int8": 20.0, "base_ptq_int8": 40.0}
WORSE = {"base_fp32": 50.0, "qat_fp32": 29.8, "qat_int8": 30.0, "base_ptq_int8": 40.0}  # passes its own gate


def run_upload(cfg, tmp_path, name: str, wer: dict, results_extra: dict | None = None) -> dict:  # noqa: F811
    """One run's end at home: its transcripts and export in a work folder, the gate, the upload."""
    work = tmp_path / name
    model = export_dir(work)  # each run trained its own model: its files differ from the published one's
    (model / "config.json").write_text(json.dumps({"model_type": "whisper", "trained_by": name}))
    write_evaluation(work, wer)
    result = claim(cfg, wer)
    gate = quality_gate.fn(cfg, result, work)
    assert gate["passed"] is True, gate["reasons"]
    return upload_to_hub.fn(cfg, {"evaluate": result, **(results_extra or {})}, gate, work)


def api(hub) -> HfApi:  # noqa: F811
    return HfApi(endpoint=hub.url, token=WRITE)


def commits(hub):  # noqa: F811
    return api(hub).list_repo_commits(REPO)


def test_a_challenger_worse_than_the_champion_is_not_published(cfg, hub, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "run-champion")
    assert run_upload(cfg, tmp_path, "first", GOOD)["uploaded"] is True
    published = json.loads(hub.file_bytes(REPO, EVAL_FILE))
    assert published["config"] == cfg.name and len(published["utterances"]) == 10
    before, card = [c.commit_id for c in commits(hub)], hub.file_bytes(REPO, "README.md")
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "run-challenger")
    link = run_upload(cfg, tmp_path, "second", WORSE)
    assert link["uploaded"] is False
    assert link["reason"].startswith("kept the published model: this model minus the published one (run run-champion): "
                                     "+10.00 points") and "over the allowed +1" in link["reason"]
    assert link["champion"]["difference"]["diff"] == 10.0 and link["champion"]["difference"]["high"] > 1.0
    assert [c.commit_id for c in commits(hub)] == before and hub.file_bytes(REPO, "README.md") == card
    assert json.loads(hub.file_bytes(REPO, EVAL_FILE))["run_id"] == "run-champion"


def test_a_better_challenger_is_published_in_its_own_commit_with_its_message(cfg, hub, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "run-champion")
    assert run_upload(cfg, tmp_path, "first", WORSE)["uploaded"] is True
    first_title = commits(hub)[0].title
    before = len(commits(hub))
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "run-challenger")
    revisions = {"model": "a" * 40, "data": "b" * 40}
    link = run_upload(cfg, tmp_path, "second", GOOD, {"revisions": revisions})
    assert link["uploaded"] is True and link["champion"]["compared"] is True
    log = commits(hub)
    assert len(log) == before + 1 and log[0].commit_id == link["commit"]
    assert log[0].title == "tiny: qat_int8 WER 20.00% on 10 test utterances (run run-challenger)"
    message = log[0].message
    assert "run: run-challenger" in message and f"model {'a' * 40}" in message and f"data {'b' * 40}" in message
    assert "gate: QAT int8 WER 20.00%; minus QAT fp32: +0.00 points" in message
    assert "champion: not worse than the published model: this model minus the published one (run run-champion): " \
           "-10.00 points" in message
    card = hub.file_bytes(REPO, "README.md").decode()
    assert "## History" in card and "not worse than the published model" in card and md_text(first_title, 200) in card
    assert json.loads(hub.file_bytes(REPO, EVAL_FILE))["run_id"] == "run-challenger"


def test_a_published_model_that_cannot_be_rescored_is_replaced_saying_so(cfg, hub, tmp_path):  # noqa: F811
    model = export_dir(tmp_path / "by-hand")
    push_model_folder(model, REPO, WRITE, card="# uploaded by hand\n")  # no per-utterance file beside it
    link = run_upload(cfg, tmp_path, "first", WORSE)
    assert link["uploaded"] is True and link["champion"]["compared"] is False
    assert f"the published model has no {EVAL_FILE}" in link["champion"]["reason"]
    other = json.loads(hub.file_bytes(REPO, EVAL_FILE))
    other["utterances"] = [[f"other-{i}", e, w] for i, (_, e, w) in enumerate(other["utterances"])]
    api(hub).upload_file(path_or_fileobj=json.dumps(other).encode(), path_in_repo=EVAL_FILE, repo_id=REPO)
    link = run_upload(cfg, tmp_path, "second", WORSE)
    assert link["uploaded"] is True and "scored on other test utterances (10 published, 10 now, 0 shared" \
        in link["champion"]["reason"]


@pytest.mark.parametrize("field, value", [("config", "int8"), ("scheme", "int4")])
def test_a_model_of_another_config_is_no_champion(cfg, hub, tmp_path, field, value):  # noqa: F811
    assert run_upload(cfg, tmp_path, "first", GOOD)["uploaded"] is True
    other = json.loads(hub.file_bytes(REPO, EVAL_FILE))
    other[field] = value
    api(hub).upload_file(path_or_fileobj=json.dumps(other).encode(), path_in_repo=EVAL_FILE, repo_id=REPO)
    link = run_upload(cfg, tmp_path, "second", WORSE)
    assert link["uploaded"] is True and "the published model is of config" in link["champion"]["reason"]
