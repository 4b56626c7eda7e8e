"""What every on-machine step shares: its work directory, progress lines, result.json, skipping.

The contract with the orchestrator (tasks/ runs these over SSH):

    python -m steps <step> --config run.yaml --workdir DIR [--resume] [--force]

* outputs go to DIR/<step>/, and DIR/<step>/result.json is written last, atomically:
  {"step", "config_hash", "status": "ok", "metrics": {...}, "outputs": [relative paths],
   "started_at", "finished_at", "seconds", "device"}
* a step whose result.json already holds the same config hash skips itself (exit 0)
* progress is printed as lines `PROGRESS {"step": ..., "done": n, "total": m, ...}`
* failures print `STEP_ERROR {"step", "type", "message", "retryable"}`, write DIR/<step>/error.json
  and exit 1 (transient: worth a retry) or 3 (deterministic: bad config, OOM, a broken invariant)
"""
from __future__ import annotations

import errno
import json
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from .config import RunConfig

# The config sections each step's outputs depend on: changing bench settings must not retrain.
STEP_SECTIONS: dict[str, tuple[str, ...]] = {
    "prepare": ("model", "data"),
    "train": ("model", "data", "quant", "train"),
    "convert": ("model", "data", "quant", "train"),
    "bench": ("model", "data", "quant", "train", "bench"),
    "evaluate": ("model", "data", "quant", "train", "eval"),
}
STEPS = tuple(STEP_SECTIONS)

EXIT_OK, EXIT_RETRYABLE, EXIT_DETERMINISTIC = 0, 1, 3


class StepError(RuntimeError):
    """A deterministic failure: retrying the same step with the same config fails again."""


def config_hash(cfg: RunConfig, step: str) -> str:
    return cfg.section_hash(*STEP_SECTIONS[step])


@dataclass
class StepContext:
    step: str
    cfg: RunConfig
    workdir: Path
    resume: bool = False
    outputs: list[str] = field(default_factory=list)

    @property
    def out(self) -> Path:
        return self.workdir / self.step

    def dir_of(self, step: str) -> Path:
        """Another step's output directory (its result.json must exist: steps run in order)."""
        d = self.workdir / step
        if not (d / "result.json").is_file():
            raise StepError(f"step {self.step!r} needs the outputs of step {step!r}; run it first")
        return d

    def result_of(self, step: str) -> dict:
        return json.loads((self.dir_of(step) / "result.json").read_text())

    def log(self, msg: str) -> None:
        print(f"[{self.step}] {msg}", flush=True)

    def progress(self, done: int, total: int, **extra: Any) -> None:
        print("PROGRESS " + json.dumps({"step": self.step, "done": done, "total": total, **extra}), flush=True)

    def add_output(self, path: Path) -> None:
        self.outputs.append(str(Path(path).relative_to(self.workdir)))


def read_result(workdir: Path, step: str) -> dict | None:
    p = Path(workdir) / step / "result.json"
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_done(cfg: RunConfig, workdir: Path, step: str) -> bool:
    r = read_result(workdir, step)
    return bool(r and r.get("status") == "ok" and r.get("config_hash") == config_hash(cfg, step))


def _atomic_write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _device() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # pragma: no cover - torch missing or broken CUDA
        pass
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _disk_full(exc: Optional[BaseException]) -> Optional[OSError]:
    """The ENOSPC error behind exc, also when a library wrapped it (datasets, safetensors...)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _classify(exc: BaseException) -> tuple[bool, str]:
    """(retryable, message) for an exception raised by a step."""
    if isinstance(exc, StepError):
        return False, str(exc)
    full = _disk_full(exc)
    if full is not None:
        return False, f"the disk is full ({full}); free space or rent a machine with more disk (machine.vast.min_disk_gb)"
    name = type(exc).__name__
    if "OutOfMemory" in name or "out of memory" in str(exc).lower():
        return False, f"out of memory: {exc}; lower train.per_device_batch_size or enable train.gradient_checkpointing"
    if isinstance(exc, (ValueError, TypeError, KeyError, FileNotFoundError, NotImplementedError)):
        return False, f"{name}: {exc}"
    return True, f"{name}: {exc}"


def run_step(step: str, cfg: RunConfig, workdir: Path, body: Callable[[StepContext], dict],
             resume: bool = False, force: bool = False) -> int:
    """Run one step's body with skipping, result.json and error reporting. Returns the exit code."""
    workdir = Path(workdir)
    ctx = StepContext(step=step, cfg=cfg, workdir=workdir, resume=resume)
    ctx.out.mkdir(parents=True, exist_ok=True)
    h = config_hash(cfg, step)
    if not force and is_done(cfg, workdir, step):
        ctx.log(f"outputs already present for config hash {h}: skipping")
        return EXIT_OK
    (ctx.out / "result.json").unlink(missing_ok=True)
    (ctx.out / "error.json").unlink(missing_ok=True)
    started = time.time()
    ctx.log(f"starting (config {cfg.name}, hash {h}, workdir {workdir})")
    try:
        metrics = body(ctx) or {}
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - every failure is reported in one shape
        retryable, message = _classify(exc)
        traceback.print_exc(file=sys.stderr)
        err = {"step": step, "type": type(exc).__name__, "message": message, "retryable": retryable}
        try:
            _atomic_write_json(ctx.out / "error.json", err)
        except OSError:
            pass
        print("STEP_ERROR " + json.dumps(err), flush=True)
        return EXIT_RETRYABLE if retryable else EXIT_DETERMINISTIC
    finished = time.time()
    result = {
        "step": step,
        "config": cfg.name,
        "config_hash": h,
        "status": "ok",
        "metrics": metrics,
        "outputs": ctx.outputs,
        "started_at": started,
        "finished_at": finished,
        "seconds": round(finished - started, 3),
        "device": _device(),
    }
    _atomic_write_json(ctx.out / "result.json", result)
    ctx.log(f"done in {finished - started:.1f}s")
    return EXIT_OK
