"""Hub revisions resolved at home and pinned (tasks/revisions.py), against the test Hub
(tests/hub_server.py: model and dataset info by revision), and what a scheduled run does with them:
same inputs -> nothing rented, no Hub commit; a new revision of the base model -> the steps run again."""
from __future__ import annotations

import asyncio
import re
import secrets
from pathlib import Path

import pytest
import yaml

from contract import fingerprint
from contract.config import ConfigError, load_config
from contract.result_file import config_hash, read_result
from hub_server import hub_fixture
from tasks.revisions import RevisionError, pinned

WRITE = f"hf_{secrets.token_hex(12)}"
BASE = "alice/whisper-tiny"  # the base model, published on the test Hub from the tiny-random fixture
REPO = "alice/tiny-qat"      # where the flow publishes


hub = hub_fixture({WRITE: ("alice", "write")})


def _hub_cfg(**overrides):
    return load_config("tiny", {"model.name_or_path": BASE, "machine.backend": "local", **overrides})


def test_the_config_takes_a_revision_for_hub_inputs_only():
    assert _hub_cfg(**{"model.revision": "v1.0"}).model.revision == "v1.0"
    for bad, field, words in (({"model.revision": "main"}, "model", "Hub id only"),
                              ({"data.revision": "main"}, "data", "'hf' only"),
                              ({"model.name_or_path": BASE, "model.revision": "a..b"}, "model.revision", "40 hex")):
        with pytest.raises(ConfigError, match=re.escape(words)) as e:
            load_config("tiny", bad)
        assert f"  {field}" in str(e.value)


def test_the_step_hash_records_the_commit():
    a, b = "a" * 40, "b" * 40
    at_a, at_b = _hub_cfg(**{"model.revision": a}), _hub_cfg(**{"model.revision": b})
    assert fingerprint.model_fingerprint(BASE, a) == f"hub:{BASE}@{a}"
    assert fingerprint.model_fingerprint(BASE, "main").endswith(f"@main ({fingerprint.UNRESOLVED})")
    for step in ("prepare", "train", "convert", "evaluate"):
        assert config_hash(at_a, step) != config_hash(at_b, step), step
    hf = load_config("int8")
    other = hf.model_copy(update={"data": hf.data.model_copy(update={"revision": b})})
    assert fingerprint.data_fingerprint(other.data).endswith(f"@{b}")
    assert config_hash(hf, "prepare") != config_hash(other, "prepare")


def test_revisions_resolve_to_commits_and_unknown_ones_are_refused(hub, tmp_path):
    first = hub.publish(BASE, {"config.json": b"{}"})
    data = hub.publish("alice/speech", {"README.md": b"rows"}, repo_type="dataset")
    cfg = load_config("int8", {"model.name_or_path": BASE, "data.dataset": "alice/speech", "data.config": None})
    at_head = pinned(cfg, endpoint=hub.url)
    assert (at_head.model.revision, at_head.data.revision) == (first, data)
    second = hub.publish(BASE, {"config.json": b"{\"v\": 2}"})
    hub.tag(BASE, "v1", first)
    assert pinned(cfg, endpoint=hub.url).model.revision == second
    assert pinned(cfg.model_copy(update={"model": cfg.model.model_copy(update={"revision": "v1"})}),
                  endpoint=hub.url).model.revision == first
    assert fingerprint.inputs_in_words(at_head) == {"model": f"Hub model {BASE} at commit {first}",
                                        "data": f"Hub dataset alice/speech at commit {data}"}

    unknown = cfg.model_copy(update={"model": cfg.model.model_copy(update={"revision": "0" * 40})})
    with pytest.raises(RevisionError, match="no such revision. Set model.revision"):
        pinned(unknown, endpoint=hub.url)
    gone = cfg.model_copy(update={"data": cfg.data.model_copy(update={"dataset": "alice/nope"})})
    with pytest.raises(RevisionError, match="dataset 'alice/nope'.*does not exist"):
        pinned(gone, endpoint=hub.url)
    with pytest.raises(RevisionError, match="could not be reached.*nothing was rented"):
        pinned(cfg, endpoint="http://127.0.0.1:9")


def test_fixture_and_manifest_inputs_need_no_hub():
    cfg = load_config("tiny")
    assert pinned(cfg, endpoint="http://127.0.0.1:9") == cfg  # nothing asked: no Hub input
    words = fingerprint.inputs_in_words(cfg)
    assert "built by the pushed code" in words["model"]
    assert words["data"].startswith("manifest fixtures/french/manifest.jsonl, content hash ")


# ------------------------------------------------------------------ scheduled runs, end to end

FAST = {"model.name_or_path": BASE, "machine.backend": "local", "hub.repo_id": REPO, "hub.private": True,
        "train.max_steps": 2, "train.save_every": 2, "train.eval_every": 2, "data.max_eval_samples": 2,
        "bench.max_clips": 1, "eval.bootstrap_samples": 20}


async def _report(flow_run_id) -> str:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async with get_client() as client:
        arts = await client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return next(a.data for a in arts if a.key == "qat-tiny-report")


def _publish_base(hub) -> str:
    from steps.models import resolve_model

    folder = Path(resolve_model("fixture:tiny-random"))
    return hub.publish(BASE, {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()})


@pytest.mark.slow
def test_a_scheduled_run_with_nothing_new_rents_nothing_and_commits_nothing_and_a_new_model_revision_retrains(
        hub, tmp_path, monkeypatch):
    from prefect_api import prefect_harness, task_states

    from flows.qat import qat

    runs = tmp_path / "runs"
    for k, v in {"QAT_RUNS_DIR": str(runs), "HF_ENDPOINT": hub.url, "HF_TOKEN": WRITE,
                 "HF_HUB_CACHE": str(tmp_path / "hf-cache")}.items():
        monkeypatch.setenv(k, v)
    first_sha = _publish_base(hub)
    with prefect_harness():
        first = qat(config="tiny", overrides=FAST, return_state=True)
        assert first.is_completed(), first.message
        assert first.result()["link"]["uploaded"] is True, first.result()["link"]
        (run1,) = [d for d in (runs / "tiny").iterdir() if d.is_dir()]
        assert read_result(run1 / "work", "train")["inputs"]["model"] == f"hub:{BASE}@{first_sha}"
        published = hub.commits(REPO)

        # the schedule fires again, nothing changed: every step done at home, nothing rented, no commit,
        # and nobody is asked to approve (a question would time out in seconds and fail the run)
        second = qat(config="tiny", overrides={**FAST, "hub.approval": "required", "hub.approval_timeout_hours": 0.002},
                     return_state=True)
        assert second.is_completed(), second.message
        tasks = task_states(second.state_details.flow_run_id, until=lambda s: s.get("publish report") == "COMPLETED")
        assert "rent machine" not in tasks and "estimate cost" not in tasks, tasks
        link = second.result()["link"]
        assert link["uploaded"] is False and link.get("unchanged") is True, link
        assert link["reason"].startswith(f"nothing new since run {run1.name}"), link["reason"]
        assert hub.commits(REPO) == published, "the unchanged run made a Hub commit"
        report = asyncio.run(_report(second.state_details.flow_run_id))
        assert f"nothing new since run {run1.name}" in report and "not asked: nothing to publish" in report, report

        # the base model gets a new revision on the Hub: the steps run again, from that commit
        new_sha = hub.publish(BASE, {"README.md": b"# a new revision\n"})
        third = qat(config="tiny", overrides=FAST, return_state=True)
        assert third.is_completed(), third.message
        tasks = task_states(third.state_details.flow_run_id, until=lambda s: s.get("publish report") == "COMPLETED")
        for step in ("rent machine", "prepare", "train", "convert", "bench", "evaluate"):
            assert tasks.get(step) == "COMPLETED", (step, tasks)
    (run3,) = sorted((runs / "tiny").glob(f"*-{third.state_details.flow_run_id}"))
    assert read_result(run3 / "work", "train")["inputs"]["model"] == f"hub:{BASE}@{new_sha}"
    assert yaml.safe_load((run3 / "run.yaml").read_text())["model"]["revision"] == new_sha  # what the machine read


@pytest.mark.slow
def test_an_unknown_pinned_revision_fails_the_flow_before_anything_is_rented(hub, tmp_path, monkeypatch):
    from prefect_api import prefect_harness, task_states

    from flows.qat import qat

    for k, v in {"QAT_RUNS_DIR": str(tmp_path / "runs"), "HF_ENDPOINT": hub.url, "HF_TOKEN": WRITE}.items():
        monkeypatch.setenv(k, v)
    hub.publish(BASE, {"config.json": b"{}"})
    with prefect_harness():
        state = qat(config="tiny", overrides={**FAST, "model.revision": "v9"}, return_state=True)
        assert state.is_failed()
        with pytest.raises(RevisionError, match="revision 'v9'.*no such revision"):
            state.result()
        tasks = task_states(state.state_details.flow_run_id, until=lambda s: s.get("pin revisions") == "FAILED")
    assert tasks.get("pin revisions") == "FAILED", tasks
    assert not {"estimate cost", "rent machine", "prepare"} & set(tasks), tasks
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("result.json"))
