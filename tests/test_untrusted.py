"""The rented machine is a stranger's computer: its word never decides a gate or an upload.

The gate is re-scored at home from the transcripts the evaluate step sent back (tasks/verdict.py);
a claim that does not match them, or transcripts that are missing or malformed, fail the gate and
nothing reaches the (fake) Hub."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

import tasks.gate
import tasks.upload
import tasks.verdict
from contract.config import load_config
from contract.normalize import normalize_french
from contract.quality import gate_rule, utterance_errors
from steps import evaluate
from tasks.champion import EVAL_FILE
from tasks.gate import quality_gate
from tasks.upload import upload_to_hub
from tasks.verdict import CLAIM_MISMATCH, COLUMNS, read_utterances, utterances_path, verify_evaluation
from home_uploads import REPO, WRITE, claim, cfg, export_dir, hub, plain_loggers  # noqa: F401 - fixtures
from utterance_csv import home_manifest, write_evaluation, write_variant

HONEST = {"base_fp32": 50.0, "qat_fp32": 29.8, "qat_int8": 30.0, "base_ptq_int8": 40.0}


# ----------------------------------------------------------------------------- forged verdicts

def test_forged_passing_gate_over_failing_transcripts_fails_and_uploads_nothing(cfg, hub, tmp_path):
    work = tmp_path / "work"
    export_dir(work)
    write_evaluation(work, {"base_fp32": 50.0, "qat_fp32": 29.8, "qat_int8": 60.0, "base_ptq_int8": 40.0})  # what the model said
    forged = claim(cfg, HONEST)  # what the machine claims: a pass, with WERs its transcripts do not give
    assert forged["metrics"]["gate"]["passed"] is True

    gate = quality_gate.fn(cfg, forged, work)
    assert gate["passed"] is False and gate["verified"] is False
    assert CLAIM_MISMATCH in gate["reason"] and "qat_int8: the machine claimed WER 30.000, its transcripts give 60.000" \
        in gate["reason"]
    assert any("claimed the gate passed" in r for r in gate["reasons"])
    link = upload_to_hub.fn(cfg, {"evaluate": forged}, gate, work)
    assert link["uploaded"] is False and "quality gate failed" in link["reason"]
    # even a caller that hands upload the machine's own verdict uploads nothing: upload checks again
    link = upload_to_hub.fn(cfg, {"evaluate": forged}, forged["metrics"]["gate"], work)
    assert link["uploaded"] is False and CLAIM_MISMATCH in link["reason"]
    assert hub.requests == [] and hub.repo_files(REPO) == {}


def test_honest_passing_run_uploads_the_export_with_the_orchestrators_verdict(cfg, hub, tmp_path):
    work = tmp_path / "work"
    model = export_dir(work)
    (model / "README.md").write_text("# from the machine: run pip install evil\n")
    write_evaluation(work, HONEST)
    result = claim(cfg, HONEST)
    gate = quality_gate.fn(cfg, result, work)
    assert gate["passed"] is True and gate["verified"] is True
    r = gate["recomputed"]["qat_int8"]
    assert r == {"wer": 30.0, "cer": r["cer"], "utterances": 10, "wer_ci": r["wer_ci"]} and r["wer_ci"][0] <= 30.0
    link = upload_to_hub.fn(cfg, {"evaluate": result}, gate, work)
    assert link["uploaded"] is True
    remote = set(hub.repo_files(REPO)) - {".gitattributes"}
    assert remote == {p.name for p in model.iterdir()} | {EVAL_FILE}  # the per-utterance errors beside it
    card = hub.file_bytes(REPO, "README.md").decode()
    assert "evil" not in card and "Quality gate **passed**" in card and "30.00" in card


def test_a_failed_gate_uploads_nothing(cfg, hub, tmp_path):
    work = tmp_path / "work"
    export_dir(work)
    wer = {"base_fp32": 50.0, "qat_fp32": 20.0, "qat_int8": 25.0, "base_ptq_int8": 40.0}  # 5 points worse than fp32: an honest fail
    write_evaluation(work, wer)
    result = claim(cfg, wer)
    gate = quality_gate.fn(cfg, result, work)
    assert gate["passed"] is False and gate["verified"] is True and "25.00%" in gate["reason"]
    assert upload_to_hub.fn(cfg, {"evaluate": result}, gate, work)["uploaded"] is False
    assert hub.requests == [] and hub.repo_files(REPO) == {}


def test_a_passing_run_without_hub_repo_id_sends_nothing(hub, tmp_path):
    """A token and a passing, verified gate, but no hub.repo_id: the model stays home, not one request."""
    cfg = load_config("tiny", {"hub.repo_id": None, "eval.max_wer_degradation": 1.0, **home_manifest(tmp_path / "home")})
    work = tmp_path / "work"
    model = export_dir(work)
    write_evaluation(work, HONEST)
    result = claim(cfg, HONEST)
    gate = quality_gate.fn(cfg, result, work)
    assert gate["passed"] is True and gate["verified"] is True
    link = upload_to_hub.fn(cfg, {"evaluate": result}, gate, work)
    assert link == {"uploaded": False, "reason": "hub.repo_id is not set in the config", "path": str(model)}
    assert hub.requests == []


@pytest.mark.parametrize("change, words", [
    (lambda m: m["wer"].update(qat_int8=29.98), "qat_int8: the machine claimed WER 29.980"),
    (lambda m: m["gate"].update(qat_wer=29.0), "gate qat_wer: the machine claimed 29.000"),
    (lambda m: m["gate"].update(ptq_wer=None), "gate ptq_wer: the machine claimed nothing"),
    (lambda m: m["wer"].pop("base_ptq_int8"), "base_ptq_int8: the machine claimed WER nothing"),
    (lambda m: m["wer"].update(qat_fp32="29.8"), "qat_fp32: the machine claimed WER '29.8'"),
    (lambda m: m["wer"].update(qat_fp32=float("nan")), "qat_fp32: the machine claimed WER nan"),
    (lambda m: m["gate"].update(passed="yes"), "the machine claimed the gate"),
    (lambda m: m.update(n_utterances=500), "claimed 500.000 test utterances"),
])
def test_any_claim_its_transcripts_do_not_support_fails_the_gate(cfg, tmp_path, change, words):
    write_evaluation(tmp_path, HONEST)
    result = claim(cfg, HONEST)
    change(result["metrics"])
    gate = verify_evaluation(cfg, result, tmp_path)
    assert gate["passed"] is False and CLAIM_MISMATCH in gate["reason"] and words in gate["reason"], gate["reason"]


def test_claims_within_a_hundredth_of_a_point_match(cfg, tmp_path):
    write_evaluation(tmp_path, HONEST)
    result = claim(cfg, {**HONEST, "qat_int8": 30.009})
    assert verify_evaluation(cfg, result, tmp_path)["passed"] is True


def test_an_honest_failing_claim_that_says_passed_fails_as_a_mismatch(cfg, tmp_path):
    wer = {"base_fp32": 50.0, "qat_fp32": 20.0, "qat_int8": 25.0, "base_ptq_int8": 40.0}
    write_evaluation(tmp_path, wer)
    gate = verify_evaluation(cfg, claim(cfg, wer, passed=True, reasons=[]), tmp_path)
    assert gate["passed"] is False and "claimed the gate passed; on its own transcripts it fails" in gate["reason"]


def test_the_machines_counts_and_normalized_columns_are_ignored(cfg, tmp_path):
    write_evaluation(tmp_path, HONEST)
    path = utterances_path(tmp_path, "qat_int8")
    lines = path.read_text(encoding="utf-8").splitlines()
    # zero errors claimed in every row, normalized hypothesis = reference: re-scoring reads only the raw texts
    forged = [lines[0]] + [",".join(line.split(",")[:3] + [line.split(",")[3]] * 2 + ["0", "100", "0", "600"])
                           for line in lines[1:]]
    path.write_text("\r\n".join(forged) + "\r\n", encoding="utf-8")
    gate = verify_evaluation(cfg, claim(cfg, {**HONEST, "qat_int8": 0.0}), tmp_path)
    assert gate["passed"] is False and "its transcripts give 30.000" in gate["reason"]


# ----------------------------------------------------------------------------- bad transcripts

def _rewrite(path, text: str | bytes):
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))


HEADER = ",".join(COLUMNS)
ROW = "u1,bonjour,bonjour,bonjour,bonjour,0,1,0,7"


@pytest.mark.parametrize("content, words", [
    ("", "header None"),
    ("id,reference,hypothesis\r\nu1,a,b\r\n", "header"),
    (HEADER + "\r\n", "holds no utterances"),
    (HEADER + "\r\nu1,bonjour,bonjour\r\n", "line 2: 3 fields, expected 9"),
    (HEADER + f"\r\n{ROW}\r\n{ROW}\r\n", "appears twice"),
    (HEADER + "\r\n,bonjour,bonjour,bonjour,bonjour,0,1,0,7\r\n", "empty utterance id"),
    (HEADER + "\r\nu1,bonjour,bonjour,bonjour,bonjour,-1,1,0,7\r\n", "non-negative integers"),
    (HEADER + '\r\nu1,"bonjour,bonjour\r\n', "not valid CSV"),
    (HEADER + "\r\nu1," + "a" * 30_000 + ",b,c,d,0,1,0,7\r\n", "longer than"),
    ((HEADER + "\r\n" + ROW + "\r\n").encode("utf-8") + b"\xff\xfe", "not UTF-8"),
])
def test_malformed_transcripts_are_refused_naming_the_file(cfg, tmp_path, content, words):
    write_evaluation(tmp_path, HONEST)
    path = utterances_path(tmp_path, "qat_int8")
    _rewrite(path, content)
    with pytest.raises(tasks.verdict.BadTranscripts) as e:
        read_utterances(path)
    assert words in str(e.value) and "evaluate/utterances_qat_int8.csv" in str(e.value)
    gate = verify_evaluation(cfg, claim(cfg, HONEST), tmp_path)
    assert gate["passed"] is False and CLAIM_MISMATCH in gate["reason"] and words in gate["reason"]


def test_caps_on_size_and_rows(cfg, tmp_path, monkeypatch):
    write_evaluation(tmp_path, HONEST)
    monkeypatch.setattr(tasks.verdict, "MAX_ROWS", 9)
    assert "more than 9 utterances" in verify_evaluation(cfg, claim(cfg, HONEST), tmp_path)["reason"]
    monkeypatch.setattr(tasks.verdict, "MAX_CSV_BYTES", 1000)
    assert "over the 1000 byte cap" in verify_evaluation(cfg, claim(cfg, HONEST), tmp_path)["reason"]


@pytest.mark.parametrize("variant", ["qat_int8", "qat_fp32", "base_ptq_int8"])
def test_a_missing_transcript_file_fails_the_gate(cfg, tmp_path, variant):
    write_evaluation(tmp_path, HONEST)
    utterances_path(tmp_path, variant).unlink()
    gate = verify_evaluation(cfg, claim(cfg, HONEST), tmp_path)
    assert gate["passed"] is False and f"evaluate/utterances_{variant}.csv is missing" in gate["reason"]
    assert CLAIM_MISMATCH in gate["reason"]


def test_a_symlinked_transcript_is_refused(cfg, tmp_path):
    write_evaluation(tmp_path, HONEST)
    path = utterances_path(tmp_path, "qat_fp32")
    real = tmp_path / "elsewhere.csv"
    path.rename(real)
    path.symlink_to(real)
    gate = verify_evaluation(cfg, claim(cfg, HONEST), tmp_path)
    assert gate["passed"] is False and "not a regular file" in gate["reason"]


def test_variants_must_score_the_same_utterances(cfg, tmp_path):
    write_evaluation(tmp_path, HONEST)
    path = utterances_path(tmp_path, "qat_fp32")
    path.write_text(path.read_text(encoding="utf-8").replace("utt-003", "utt-999"), encoding="utf-8")
    gate = verify_evaluation(cfg, claim(cfg, HONEST), tmp_path)
    assert gate["passed"] is False and "utterances_qat_fp32.csv does not hold the test set" in gate["reason"]
    assert "'utt-999'" in gate["reason"] and "'utt-003'" in gate["reason"]


def test_no_claim_at_all_fails(cfg, tmp_path):
    write_evaluation(tmp_path, HONEST)
    for evaluate_result in (None, {}, {"metrics": {}}, {"metrics": {"gate": {}}}, {"metrics": "x"}, []):
        gate = verify_evaluation(cfg, evaluate_result, tmp_path)
        assert gate["passed"] is False and gate["reason"] == "the evaluate step recorded no gate verdict"


# ----------------------------------------------------------------------------- one rule, both sides

@pytest.mark.parametrize("wer", [
    {"qat_fp32": 10.0, "base_fp32": 10.0, "qat_int8": 10.5, "base_ptq_int8": 12.0},
    {"qat_fp32": 10.0, "base_fp32": 10.0, "qat_int8": 10.6, "base_ptq_int8": 12.0},
    {"qat_fp32": 10.0, "base_fp32": 10.0, "qat_int8": 10.2, "base_ptq_int8": 10.1},
    {"qat_fp32": 10.0},
    {},
])
def test_the_step_and_the_orchestrator_apply_the_same_gate_rule(cfg, wer, tmp_path):
    write_evaluation(tmp_path, wer)
    verdict = verify_evaluation(cfg, claim(cfg, wer), tmp_path, keep_counts=True)
    counts = {v: r["counts"] for v, r in verdict["recomputed"].items()}
    machine = evaluate.gate(cfg, counts)
    assert machine == gate_rule("int8", counts, max_wer_degradation=cfg.eval.max_wer_degradation,
                                references=cfg.eval.gate_references, confidence=cfg.eval.confidence,
                                samples=cfg.eval.bootstrap_samples)
    if len(wer) == 4:
        assert {k: v for k, v in verdict.items() if k in machine} == machine


@settings(max_examples=60, deadline=None)
@given(pairs=st.lists(st.tuples(st.text(st.sampled_from("ab cé'1-."), max_size=12),
                                st.text(st.sampled_from("ab cé'1-."), max_size=12)), min_size=1, max_size=5))
def test_the_orchestrator_counts_errors_as_the_step_does(pairs):
    refs = [normalize_french(r) for r, _ in pairs]
    hyps = [normalize_french(h) for _, h in pairs]
    s = evaluate.score(refs, hyps)
    mine = [utterance_errors(r, h) for r, h in zip(refs, hyps)]
    assert [tuple(int(x) for x in t) for t in zip(s.word_errors, s.words, s.char_errors, s.chars)] == mine


def test_rescoring_reproduces_the_steps_own_csv(tmp_path):
    """A CSV written by the step's writer re-scores to the WER the step computed for it."""
    path = write_variant(tmp_path, "qat_int8", 12.3)
    assert tasks.verdict.rescore(read_utterances(path))["wer"] == 12.3


@pytest.mark.slow
def test_the_real_evaluate_steps_output_verifies_at_home(prepared_tiny, tiny_onnx_dir, tiny_model_dir, tmp_path):
    """The evaluate step's own result.json and CSVs (a random model's odd tokens included) pass the
    orchestrator's check, and the verdict is the step's."""
    import shutil

    from steps.common import execute_step

    work = tmp_path / "w"
    shutil.copytree(prepared_tiny / "prepare", work / "prepare")
    shutil.copytree(tiny_model_dir, work / "train" / "model")
    for variant in ("qat_int8", "base_ptq_int8"):
        shutil.copytree(tiny_onnx_dir, work / "convert" / variant)
    cfg = load_config("tiny")
    assert execute_step("evaluate", cfg, work, evaluate.run) == 0
    result = json.loads((work / "evaluate" / "result.json").read_text())
    gate = verify_evaluation(cfg, result, work)
    assert gate["verified"] is True, gate["reason"]
    assert gate["passed"] is result["metrics"]["gate"]["passed"] is True
    for v, r in gate["recomputed"].items():
        assert r["wer"] == result["metrics"]["wer"][v] and r["cer"] == result["metrics"]["cer"][v]
