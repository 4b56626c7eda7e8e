"""The run directory at home: where a config's outputs come back to, and what is already there.

    runs/<config name>/run.yaml      the resolved config
    runs/<config name>/work/<step>/  each step's outputs, copied home as the step finishes
"""
from __future__ import annotations

import os
from pathlib import Path

from prefect import get_run_logger, task

from contract.catalogue import STEPS
from contract.config import RunConfig, load_config
from contract.layout import REPO_ROOT
from contract.result_file import is_done, read_result

__all__ = ["STEPS", "all_steps_done", "open_run_dir", "results_at_home", "runs_dir", "validate_config"]


def runs_dir() -> Path:
    return Path(os.environ.get("QAT_RUNS_DIR", REPO_ROOT / "runs"))


@task(name="validate config")
def validate_config(config: str, overrides: dict) -> RunConfig:
    """Refuse bad input before a single cent is spent."""
    cfg = load_config(config, overrides)
    get_run_logger().info("config %s valid: %s on %s, %s, backend %s", cfg.name, cfg.model.name_or_path,
                          cfg.data.dataset or cfg.data.manifest, cfg.quant.scheme, cfg.machine.backend)
    return cfg


def open_run_dir(cfg: RunConfig) -> tuple[Path, Path]:
    """(run directory, its work/ folder), created, with the resolved config written beside them."""
    run_dir = runs_dir() / cfg.name
    local_work = run_dir / "work"
    local_work.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.yaml").write_text(cfg.to_yaml())
    return run_dir, local_work


def all_steps_done(cfg: RunConfig, local_work: Path) -> bool:
    return all(is_done(cfg, local_work, s) for s in STEPS)


def results_at_home(local_work: Path) -> dict[str, dict]:
    return {s: read_result(local_work, s) for s in STEPS}
