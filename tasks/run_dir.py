"""The run directory at home: one per flow run, and the earlier runs whose results it reuses.

    runs/<config name>/<run id>/run.yaml      the resolved config
    runs/<config name>/<run id>/work/<step>/  each step's outputs, copied home as the step finishes
    runs/<config name>/<run id>/report/       the report

<run id> is `<UTC time>-<flow run id>` (`<UTC time>-local-<random>` outside a flow run), so two runs
of one config never share a folder; a retry of the same flow run finds its own folder again.
Results of earlier runs are reused by hash, not by name, and only on home's word: when the new
run's work/ is opened, each step that an earlier run of the config (newest first; the old
`runs/<name>/work` layout included) completed for the step's current hash (config sections, code,
data, model: contract/result_file.py) AND whose files still match the record home wrote when they
came home (tasks/home_record.py) is hard-linked into it (copied where links are impossible), bulk
outputs left out. A result.json alone is the machine's word: a step without a matching record is
run again (in a retry's own folder, its result.json is renamed `result.json.unverified`). Only
reused steps are pushed to a machine, so a step of another config never reaches one.
"""
from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Optional

from prefect import get_run_logger, task

from contract.catalogue import BULK_OUTPUTS, STEPS, Scheme  # noqa: F401 - Scheme, Backend: the flow's parameter types
from contract.config import RunConfig, load_config
from contract.disk import require_disk
from contract.layout import REPO_ROOT
from contract.machine_config import Backend  # noqa: F401
from contract.result_file import RESULT_FILE, is_done, read_result

from .home_record import done_at_home, write_record

__all__ = ["STEPS", "all_steps_done", "open_run_dir", "results_at_home", "run_dirs", "runs_dir",
           "validate_config"]

WORK = "work"


def runs_dir() -> Path:
    return Path(os.environ.get("QAT_RUNS_DIR", REPO_ROOT / "runs"))


@task(name="validate config")
def validate_config(config: str, overrides: dict) -> RunConfig:
    """Refuse bad input before a single cent is spent."""
    cfg = load_config(config, overrides)
    plan = require_disk(cfg)  # the disk rented must hold prepare + checkpoints + exports
    get_run_logger().info("config %s valid: %s on %s, %s, backend %s; disk %s", cfg.name, cfg.model.name_or_path,
                          cfg.data.dataset or cfg.data.manifest, cfg.quant.scheme, cfg.machine.backend, plan.describe())
    return cfg


def run_dirs(name: str, root: Optional[Path] = None) -> list[Path]:
    """The run directories of config `name`, oldest first (the old shared `runs/<name>` first of all)."""
    base = Path(root or runs_dir()) / name
    found = sorted(p for p in base.iterdir() if p.is_dir() and (p / WORK).is_dir()) if base.is_dir() else []
    return ([base] if (base / WORK).is_dir() else []) + found


def _flow_run_id() -> Optional[str]:
    try:
        from prefect.runtime import flow_run

        return flow_run.get_id()
    except Exception:  # noqa: BLE001 - outside a flow run
        return None


def _log(msg: str, *args) -> None:
    try:
        get_run_logger().info(msg, *args)
    except Exception:  # noqa: BLE001 - outside a flow or task run
        import logging

        logging.getLogger(__name__).info(msg, *args)


def _link_tree(src: Path, dest: Path, skip: tuple[str, ...]) -> None:
    """Hard-link src into dest (a copy where linking fails), top-level `skip` names left out,
    through a uniquely named temporary folder and a rename."""
    tmp = dest.with_name(f".{dest.name}.reuse-{os.getpid()}-{uuid.uuid4().hex[:8]}")

    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    try:
        shutil.copytree(src, tmp, copy_function=link, symlinks=False,
                        ignore=lambda d, names: [n for n in names if Path(d) == src and n in skip])
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def reuse_earlier_results(cfg: RunConfig, run_dir: Path, local_work: Path) -> dict[str, str]:
    """Link into `local_work` each step done for the current hash in an earlier run of this config.
    Returns {step: the run directory it came from}."""
    earlier = [d for d in reversed(run_dirs(cfg.name, run_dir.parent.parent)) if d.resolve() != run_dir.resolve()]
    reused: dict[str, str] = {}
    for step in STEPS:
        if done_at_home(cfg, local_work, step):
            continue
        for d in earlier:
            if done_at_home(cfg, d / WORK, step):
                shutil.rmtree(local_work / step, ignore_errors=True)
                _link_tree(d / WORK / step, local_work / step, BULK_OUTPUTS.get(step, ()))
                if write_record(cfg, local_work, step, same_as=d / WORK):
                    reused[step] = d.name
                    break
                shutil.rmtree(local_work / step, ignore_errors=True)  # changed while linked: not reused
    if reused:
        _log("reused results of earlier runs (same hash): %s", ", ".join(f"{s} from {d}" for s, d in reused.items()))
    return reused


def open_run_dir(cfg: RunConfig, run_id: Optional[str] = None) -> tuple[Path, Path]:
    """(run directory, its work/ folder) for this flow run, created, with the resolved config written
    beside them and the results of earlier runs that still hold the current hash linked in."""
    base = runs_dir() / cfg.name
    run_id = run_id or _flow_run_id()
    mine = sorted(base.glob(f"*-{run_id}")) if run_id and base.is_dir() else []
    if mine:  # a retry of this flow run: its own folder
        run_dir = mine[-1]
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + f"{time.time() % 1:.6f}"[1:].replace(".", "-")
        run_dir = base / f"{stamp}-{run_id or 'local-' + uuid.uuid4().hex[:8]}"
    local_work = run_dir / WORK
    local_work.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.yaml").write_text(cfg.to_yaml())
    _log("run directory %s", run_dir)
    _unverified_aside(cfg, local_work)
    reuse_earlier_results(cfg, run_dir, local_work)
    return run_dir, local_work


def _unverified_aside(cfg: RunConfig, local_work: Path) -> None:
    """A retry's own folder: a step whose result.json holds the hash without home's record (its
    outputs never checked, or edited since) is not done: its result.json is renamed, and the step runs."""
    for step in STEPS:
        if is_done(cfg, local_work, step) and not done_at_home(cfg, local_work, step):
            os.replace(local_work / step / RESULT_FILE, local_work / step / f"{RESULT_FILE}.unverified")
            _log("%s: result.json holds the current hash but home holds no matching record of its outputs: "
                 "it runs again", step)


def all_steps_done(cfg: RunConfig, local_work: Path) -> bool:
    return all(done_at_home(cfg, local_work, s) for s in STEPS)


def results_at_home(local_work: Path) -> dict[str, dict]:
    return {s: read_result(local_work, s) for s in STEPS}
