"""The quality gate, decided at home from the evaluate step's outputs (no machine needed).

The machine's own verdict (steps/evaluate.py, in result.json) is only a claim: tasks/verdict.py
re-scores the per-utterance transcripts it sent back with the same normalizer and the same rule
(contract/quality.py), and the gate passes only if that recomputed verdict passes and the
machine's claimed WERs and verdict match it. The sentence is tasks/scorecard.py's, so the report
and the model card say the same thing."""
from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from contract.config import RunConfig

from .home_record import VERIFIED_STEP, write_record
from .verdict import verify_evaluation


@task(name="quality gate")
def quality_gate(cfg: RunConfig, evaluate: dict, local_work: Path) -> dict:
    """The orchestrator's verdict plus `reason`; not passed when evaluate recorded none, when its
    transcripts at home (`local_work`/evaluate/) are missing, malformed or not the test set home
    read, or when the machine's claimed figures do not match them. Only verified outputs get home's
    record (tasks/home_record.py): anything else is evaluated again by the next run."""
    verdict = verify_evaluation(cfg, evaluate, Path(local_work))
    if verdict["verified"]:
        write_record(cfg, Path(local_work), VERIFIED_STEP)
    log = get_run_logger()
    (log.info if verdict["passed"] else log.warning)("quality gate %s: %s",
                                                     "passed" if verdict["passed"] else "FAILED", verdict["reason"])
    return verdict
