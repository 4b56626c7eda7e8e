"""A machine that forges a passing gate, and one that writes markdown into its figures (issue 19,
findings 1 and 6), through the emulator's `evil` modes (devtools/emulator/evil.py) over real SSH.

The machine's evaluate outputs are those of a model that fails the gate (60 % WER against 29.8 %
in fp32); each forgery rewrites them on the way home so that the transcripts and the claims agree
(what the old re-scoring accepted). Home holds its own test set (tasks/references.py) and its own
record of what came home (tasks/home_record.py): each forgery fails the gate naming it, is never
recorded, and the next run of the config does not reuse it. Markdown in train metric keys, bench
strings and variant names never reaches the model card or the report as markdown."""
from __future__ import annotations

import json
import re

import pytest

import tasks.gate
from conftest import require_sshd
from contract.config import load_config
from contract.result_file import config_hash, read_result, write_json_atomic
from devtools.emulator.evil import BEACON, HTML, NOTICE, PHISH
from tasks.gate import quality_gate
from tasks.model_card import render_model_card
from tasks.remote_step import fetch_outputs
from tasks.report import render_report
from tasks.run_dir import open_run_dir
from tasks.scorecard import step_metrics
from tasks.verdict import verified_metrics, verify_evaluation
from task_loggers import plain_loggers_for
from utterance_csv import home_manifest, write_evaluation

BAD_MODEL = {"base_fp32": 50.0, "qat_fp32": 29.8, "qat_int8": 60.0, "base_ptq_int8": 40.0}
# mode -> what the refusal names
FORGERIES = {
    "forge_refs": "reference(s) that are not the test split's",
    "forge_subset": "of the 10 test utterances missing",
    "unknown_ids": "utterance id(s) not in the test set",
    "duplicates": "appears twice",
}


plain_loggers = plain_loggers_for(tasks.gate)


@pytest.fixture
def bad_model_on_machine(evil_machine, tmp_path, monkeypatch):  # noqa: F811
    """The machine's work/evaluate holds a failing model's transcripts and its honest, failing claim
    (with the step's own config hash); home has a run directory of the config to bring them into."""
    emu, lease, m, _ = evil_machine
    monkeypatch.setenv("QAT_RUNS_DIR", str(tmp_path / "runs"))
    cfg = load_config("tiny", {"eval.max_wer_degradation": 0.5, **home_manifest(tmp_path / "home")})
    honest = tmp_path / "machine"
    write_evaluation(honest, BAD_MODEL)
    from steps.evaluate import gate
    from utterance_csv import counts

    write_json_atomic(honest / "evaluate" / "result.json", {
        "step": "evaluate", "status": "ok", "config_hash": config_hash(cfg, "evaluate"),
        "metrics": {"wer": BAD_MODEL, "cer": {v: 1.0 for v in BAD_MODEL}, "n_utterances": 10,
                    "gate": gate(cfg, counts(BAD_MODEL))}})
    m.run(["sh", "-c", "rm -rf qat/work && mkdir -p qat/work"])
    m.put(honest, "qat/work", include=["evaluate"], respect_gitignore=False)
    yield emu, lease, m, cfg
    emu.set_faults(id=lease.instance_id, evil=None)


@pytest.mark.parametrize("mode", list(FORGERIES))
def test_each_forged_passing_gate_is_refused_naming_it_and_never_reused(bad_model_on_machine, mode):
    emu, lease, m, cfg = bad_model_on_machine
    run_dir, local_work = open_run_dir(cfg, run_id=f"forged-{mode}")
    emu.set_faults(id=lease.instance_id, evil=mode)
    fetch_outputs(m, "evaluate", local_work, succeeded=True)
    result = read_result(local_work, "evaluate")
    assert result["metrics"]["gate"]["passed"] is True, "the forgery claims a pass"
    assert result["config_hash"] == config_hash(cfg, "evaluate"), "and the hash 'already done' used to trust"

    gate = quality_gate.fn(cfg, result, local_work)
    assert gate["passed"] is False and gate["verified"] is False, gate
    assert FORGERIES[mode] in gate["reason"], gate["reason"]
    from tasks.home_record import done_at_home, record_path

    assert not record_path(local_work, "evaluate").exists() and not done_at_home(cfg, local_work, "evaluate")

    _, next_work = open_run_dir(cfg, run_id=f"next-{mode}")  # the next scheduled run of the config
    assert not (next_work / "evaluate").exists(), "a forged evaluate was reused"


def test_the_honest_failing_run_verifies_and_is_recorded(bad_model_on_machine):
    """The same machine without forgery: home verifies it (the gate fails on its merits), records it,
    and the next run reuses it; editing what came home then makes it run again."""
    from tasks.home_record import done_at_home

    emu, lease, m, cfg = bad_model_on_machine
    _, local_work = open_run_dir(cfg, run_id="honest")
    fetch_outputs(m, "evaluate", local_work, succeeded=True)
    gate = quality_gate.fn(cfg, read_result(local_work, "evaluate"), local_work)
    assert gate["verified"] is True and gate["passed"] is False \
        and "qat_int8 - qat_fp32 = +30.20 points" in " ".join(gate["reasons"])
    assert done_at_home(cfg, local_work, "evaluate")
    _, reused = open_run_dir(cfg, run_id="honest-next")
    assert done_at_home(cfg, reused, "evaluate")

    csv_file = local_work / "evaluate" / "utterances_qat_int8.csv"
    csv_file.write_text(csv_file.read_text().replace("jardin", "maison"))  # edited at home (hard links: both runs)
    assert not done_at_home(cfg, local_work, "evaluate")
    _, third = open_run_dir(cfg, run_id="after-edit")
    assert not (third / "evaluate").exists()


def test_a_retry_does_not_trust_its_own_unrecorded_result(bad_model_on_machine):
    """A flow run retried in its own folder: evaluate came home (forged) but home never recorded it."""
    emu, lease, m, cfg = bad_model_on_machine
    emu.set_faults(id=lease.instance_id, evil="forge_refs")
    _, local_work = open_run_dir(cfg, run_id="retried")
    fetch_outputs(m, "evaluate", local_work, succeeded=True)
    _, again = open_run_dir(cfg, run_id="retried")
    assert again == local_work and not (again / "evaluate" / "result.json").exists()
    assert (again / "evaluate" / "result.json.unverified").is_file()


# ------------------------------------------------------------------ markdown from the machine

def _machine_result(m, step: str, metrics: dict) -> None:
    m.run(["mkdir", "-p", f"qat/work/{step}"])
    m.write_text(f"qat/work/{step}/result.json", json.dumps({"step": step, "status": "ok", "metrics": metrics}))


LINK_OR_MARKUP = re.compile(r"evil\.invalid|(?<!\\)\]\(|!\[|<img|\*\*SECURITY")


def test_markdown_in_machine_strings_never_reaches_the_card_or_the_report(bad_model_on_machine):
    emu, lease, m, cfg = bad_model_on_machine
    _, local_work = open_run_dir(cfg, run_id="markdown")
    _machine_result(m, "train", {"train_loss": 0.5, "optimizer_steps": 4})
    _machine_result(m, "bench", {"devices": {"cpu": {"latency_s": {"base_fp32": 2.0, "qat_int8": 0.8},
                                                     "size_mb": {"qat_int8": 80.0}}}})
    emu.set_faults(id=lease.instance_id, evil="md_inject")
    for step in ("train", "bench", "evaluate"):
        fetch_outputs(m, step, local_work, succeeded=True)
    results = {s: read_result(local_work, s) for s in ("train", "bench", "evaluate")}
    assert NOTICE in results["train"]["metrics"] and PHISH in json.dumps(results["bench"])  # they came home
    gate = verify_evaluation(cfg, results["evaluate"], local_work)
    card = render_model_card(cfg, verified_metrics(step_metrics(results), gate))
    report = render_report(cfg, None, results, [], {}, gate, {"uploaded": False, "reason": HTML + BEACON})
    for text in (card, report):
        assert not LINK_OR_MARKUP.search(text), LINK_OR_MARKUP.findall(text)
        assert "onerror" not in text or "<img" not in text
    assert "train loss 0.5" in card and "as the rented machine reported them" in card
    assert "measured on the rented machine" in card and "measured on the rented machine" in report


# ------------------------------------------------------------------ the done-when: two whole runs

FAST = {"train.max_steps": 2, "train.save_every": 2, "train.eval_every": 2, "data.max_eval_samples": 2,
        "bench.max_clips": 1, "eval.bootstrap_samples": 20, "hub.repo_id": "evil/forged-gate"}


@pytest.mark.slow
def test_a_forged_passing_gate_uploads_nothing_and_the_next_run_evaluates_again(tmp_path, monkeypatch):
    """Run 1 rents an evil machine whose evaluate outputs come home with references rewritten to the
    model's output, claims to match and the step's own hash: the gate fails at home, nothing reaches
    the Hub. Run 2 of the config (an honest machine) reuses prepare..bench from run 1 by home's
    record, and rents a machine to run evaluate again instead of reusing the forged one."""
    from prefect_api import prefect_harness

    from devtools.emulator.testing import EmulatorProcess
    from flows.qat import qat
    from hub_server import HubServer

    require_sshd()
    token = "hf_forgedgate" + "0" * 24
    emu = EmulatorProcess(state_dir=tmp_path / "emulator").start()
    runs = tmp_path / "runs"
    try:
        with HubServer(tmp_path / "hub", {token: ("evil", "write")}) as hub:
            for k, v in {"VAST_API_KEY": emu.api_key, "VAST_URL": emu.url, "QAT_RUNS_DIR": str(runs),
                         "HF_ENDPOINT": hub.url, "HF_TOKEN": token}.items():
                monkeypatch.setenv(k, v)
            with prefect_harness():
                emu.set_faults(label_prefix="qat-", evil="forge_refs")
                first = qat(config="tiny", overrides=FAST, return_state=True)
                assert first.is_completed(), first.message
                out = first.result()
                assert out["gate"]["passed"] is False and "not the test split's" in out["gate"]["reason"], out["gate"]
                assert out["link"]["uploaded"] is False
                assert hub.repo_files("evil/forged-gate") in ({}, None, []), "something reached the Hub"
                (run1,) = [d for d in (runs / "tiny").iterdir() if d.is_dir()]
                assert read_result(run1 / "work", "evaluate")["metrics"]["gate"]["passed"] is True  # the forged claim

                emu.set_faults(label_prefix="qat-", evil=None)
                second = qat(config="tiny", overrides=FAST, return_state=True)
                assert second.is_completed(), second.message
                assert second.result()["gate"]["verified"] is True, second.result()["gate"]
        (run2,) = [d for d in (runs / "tiny").iterdir() if d.is_dir() and d != run1]
        rented = [r for r in emu.ledger()["instances"] if (r["label"] or "").startswith("qat-")]
        assert len(rented) == 2, "run 2 rented a machine: evaluate was not 'already done'"
        ino = lambda d, s: (d / "work" / s / "result.json").stat().st_ino  # noqa: E731
        for step in ("train", "convert", "bench"):
            assert ino(run1, step) == ino(run2, step), f"{step} was reused from run 1 (home's record)"
        assert ino(run1, "evaluate") != ino(run2, "evaluate")
        assert "not the test split's" not in json.dumps(read_result(run2 / "work", "evaluate"))
        assert emu.live_instances() == []
    finally:
        emu.cleanup()
    assert emu.sshd_pids() == []
