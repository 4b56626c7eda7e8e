"""The qat flow: unit checks of its tasks through .fn(), and one end-to-end run of the whole DAG
through the Vast.ai emulator and real sshd, with the tiny model, under a real Prefect server."""
from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

import tasks.gate
from contract.config import load_config
from prefect_api import task_states
from tasks.gate import quality_gate
from tasks.report import render_report
from tasks.retry import StepFailed, is_transient
from tasks.scorecard import results_table, step_metrics
from task_loggers import plain_loggers_for

DAG = ["validate config", "estimate cost", "rent machine", "push code", "set up environment", "prepare", "train",
       "convert", "bench", "evaluate", "destroy machine", "quality gate", "what would be published", "publish report"]


def _results(wer_qat=30.0, wer_fp32=29.8, wer_ptq=40.0) -> dict:
    return {
        "evaluate": {"metrics": {
            "wer": {"base_fp32": 50.0, "qat_fp32": wer_fp32, "qat_int8": wer_qat, "base_ptq_int8": wer_ptq},
            "cer": {"base_fp32": 20.0, "qat_fp32": 10.0, "qat_int8": 10.5, "base_ptq_int8": 15.0},
            "wer_ci": {"qat_int8": [25.0, 35.0]},
            "gate": {"passed": wer_qat <= wer_fp32 + 0.5 and wer_qat <= wer_ptq, "qat_wer": wer_qat,
                     "qat_fp32_wer": wer_fp32, "ptq_wer": wer_ptq, "max_wer_degradation": 0.5}}},
        "bench": {"metrics": {"devices": {"cpu": {"latency_s": {"base_fp32": 2.0, "qat_int8": 0.8},
                                                  "size_mb": {"base_fp32": 290.0, "qat_int8": 80.0}}}}},
    }


def test_results_table_joins_evaluate_and_bench():
    table = results_table("int8", step_metrics(_results()))
    rows = {r["variant"]: r for r in table}
    assert len(rows) == len(table)  # one row per variant
    assert rows["qat_int8"]["speedup"] == 2.5
    assert rows["qat_int8"]["size_mb"] == 80.0 and rows["qat_int8"]["wer_pct"] == 30.0
    assert rows["base_ptq_int8"]["latency_s"] is None


def test_quality_gate_reads_the_measured_verdict(plain_loggers, tmp_path):
    from utterance_csv import home_manifest, write_evaluation

    cfg = load_config("tiny", home_manifest(tmp_path / "home"))
    passing, failing = tmp_path / "passing", tmp_path / "failing"  # the transcripts the verdict is re-scored from
    write_evaluation(passing, {"base_fp32": 50.0, "qat_fp32": 29.8, "qat_int8": 30.0, "base_ptq_int8": 40.0})
    write_evaluation(failing, {"base_fp32": 50.0, "qat_fp32": 29.8, "qat_int8": 45.0, "base_ptq_int8": 40.0})
    assert quality_gate.fn(cfg, _results()["evaluate"], passing)["passed"] is True
    failed = quality_gate.fn(cfg, _results(wer_qat=45.0)["evaluate"], failing)
    assert failed["passed"] is False and "45.00%" in failed["reason"]
    assert quality_gate.fn(cfg, None, passing)["passed"] is False


def test_report_has_every_section():
    md = render_report(load_config("tiny"), None, _results(),
                       [{"step": "train", "seconds": 10.0, "usd": 0.01, "total": False},
                        {"step": "total", "seconds": 12.0, "usd": 0.012, "total": True}],
                       {}, {"passed": True, "reason": "ok"}, {"uploaded": False, "path": "/x", "reason": "no token"})
    for part in ("## Configuration", "## Timings and cost", "## Results", "## Quality gate", "Quality gate **passed**: ok",
                 "0.0120", "qat_int8"):
        assert part in md


def test_retry_policy_separates_transient_from_deterministic():
    from infra.machines.machine import CommandFailed, TransientMachineError
    from contract.config import ConfigError

    assert is_transient(TransientMachineError("connection dropped"))
    assert is_transient(StepFailed("train", "socket", retryable=True))
    assert not is_transient(StepFailed("train", "out of memory", retryable=False))
    assert not is_transient(ConfigError("bad"))
    assert not is_transient(CommandFailed("x", 2, ""))


plain_loggers = plain_loggers_for(tasks.gate, autouse=False)


# ------------------------------------------------------------------ end to end (real everything)

async def _artifacts(flow_run_id) -> dict[str, object]:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async with get_client() as client:
        arts = await client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in arts if a.key}


@pytest.mark.slow
def test_the_whole_dag_end_to_end(prefect_server, emulated_vast, tmp_path):
    from flows.qat import qat

    state = qat(config="tiny", return_state=True)
    assert state.is_completed(), state.message
    out = state.result()
    flow_run_id = state.state_details.flow_run_id

    states = task_states(flow_run_id, until=lambda s: all(s.get(name) == "COMPLETED" for name in DAG))
    for name in DAG:
        assert states.get(name) == "COMPLETED", (name, states)
    assert "upload to hub" not in states, states  # tiny names no hub.repo_id: nothing to publish, no upload task

    arts = asyncio.run(_artifacts(flow_run_id))
    for key in ("qat-tiny-report", "qat-tiny-metrics", "qat-tiny-cost", "qat-tiny-model", "qat-tiny-chart", "train-progress"):
        assert key in arts, sorted(arts)
    report = arts["qat-tiny-report"].data
    assert "## Results" in report and "qat_int8" in report and "Quality gate" in report

    # The cost the flow reports is the emulator's bill for that instance (same $/h, same life).
    ledger = emulated_vast.ledger()
    billed = [r for r in ledger["instances"] if r["label"].startswith("qat-")]
    assert len(billed) == 1 and billed[0]["ended_at"] is not None
    # The emulator bills time (GPU + storage); the flow adds the bytes copied home at the offer's
    # bandwidth price, which the cost table shows in a row of its own.
    cost_rows = json.loads(arts["qat-tiny-cost"].data)
    bandwidth = sum(r["usd"] for r in cost_rows if r["step"].startswith("bandwidth"))
    assert bandwidth > 0
    assert out["cost_usd"] - bandwidth == pytest.approx(billed[0]["cost"], rel=0.05, abs=2e-5)

    # Nothing produced is lost: the outputs came home.
    run_dirs = sorted((Path(os.environ["QAT_RUNS_DIR"]) / "tiny").glob(f"*-{flow_run_id}"))  # one per flow run
    assert len(run_dirs) == 1, run_dirs
    work = run_dirs[0] / "work"
    for step in ("prepare", "train", "convert", "bench", "evaluate"):
        assert (work / step / "result.json").is_file(), step
    assert (work / "convert" / "qat_int8").is_dir()

    # A re-run skips every step and rents nothing.
    again = qat(config="tiny", return_state=True)
    assert again.is_completed()
    assert len([r for r in emulated_vast.ledger()["instances"] if r["label"].startswith("qat-")]) == 1
