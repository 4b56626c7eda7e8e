"""What every on-machine step shares: its context (work directory, progress lines) and the one
wrapper that runs a step's body with skipping, result.json and error reporting.

The command line, exit codes, line formats and result.json are the contract with the orchestrator:
contract/catalogue.py and contract/result_file.py.
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

from contract.catalogue import EXIT_DETERMINISTIC, EXIT_OK, EXIT_RETRYABLE, PROGRESS_PREFIX, error_line
from contract.config import RunConfig
from contract.result_file import ERROR_FILE, RESULT_FILE, config_hash, input_fingerprints, read_result, write_json_atomic

from . import distributed
from .errors import StepError

__all__ = ["StepContext", "StepError", "execute_step"]


@dataclass
class StepContext:
    step: str
    cfg: RunConfig
    workdir: Path
    resume: bool = False
    outputs: list[str] = field(default_factory=list)
    save_every: Optional[int] = None  # train: the orchestrator's cadence (below train.save_every), not hashed

    @property
    def out(self) -> Path:
        return self.workdir / self.step

    def dir_of(self, step: str) -> Path:
        """Another step's output directory (its result.json must exist: steps run in order)."""
        d = self.workdir / step
        if not (d / RESULT_FILE).is_file():
            raise StepError(f"step {self.step!r} needs the outputs of step {step!r}; run it first")
        return d

    def log(self, msg: str) -> None:
        print(f"[{self.step}] {msg}", flush=True)

    def progress(self, done: int, total: int, **extra: Any) -> None:
        print(PROGRESS_PREFIX + json.dumps({"step": self.step, "done": done, "total": total, **extra}), flush=True)

    def add_output(self, path: Path) -> None:
        self.outputs.append(str(Path(path).relative_to(self.workdir)))


def _silent(*_args: Any, **_kw: Any) -> None:
    pass


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


def _missing_model(exc: BaseException) -> Optional[str]:
    """steps/models.py's reading of exc's chain (imported late: it imports torch)."""
    if "steps.models" not in sys.modules and "huggingface_hub" not in sys.modules and "transformers" not in sys.modules:
        return None  # nothing that could have raised it was imported
    from .models import missing_model_reason

    return missing_model_reason(exc)


def _out_of_memory(exc: BaseException) -> bool:
    """torch's CUDA out-of-memory error (torch is loaded when one can be raised), or an allocator's message."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return "out of memory" in str(exc).lower()


def _classify(exc: BaseException) -> tuple[bool, str]:
    """(retryable, message) for an exception raised by a step."""
    if isinstance(exc, StepError):
        return False, str(exc)
    full = _disk_full(exc)
    if full is not None:
        return False, f"the disk is full ({full}); free space or rent a machine with more disk (machine.vast.min_disk_gb)"
    name = type(exc).__name__
    missing = _missing_model(exc)
    if missing is not None:  # a missing model/repo is deterministic (transformers raises it as an OSError)
        return False, missing
    if _out_of_memory(exc):
        return False, f"out of memory: {exc}; lower train.per_device_batch_size or enable train.gradient_checkpointing"
    if isinstance(exc, (ValueError, TypeError, KeyError, FileNotFoundError, NotImplementedError)):
        return False, f"{name}: {exc}"
    return True, f"{name}: {exc}"


def execute_step(step: str, cfg: RunConfig, workdir: Path, body: Callable[[StepContext], dict],
             resume: bool = False, force: bool = False, save_every: Optional[int] = None) -> int:
    """Run one step's body with skipping, result.json and error reporting. Returns the exit code.

    The step is skipped when its result.json holds the current hash: config sections plus the code,
    data and model fingerprints (contract/result_file.py config_hash), recorded as "inputs"."""
    workdir = Path(workdir)
    ctx = StepContext(step=step, cfg=cfg, workdir=workdir, resume=resume, save_every=save_every)
    ctx.out.mkdir(parents=True, exist_ok=True)
    ranks, lead = distributed.world_size(), distributed.rank() == 0  # torchrun's ranks: rank 0 alone speaks
    if not lead:
        ctx.log = ctx.progress = _silent  # type: ignore[method-assign]
    inputs = input_fingerprints(cfg, step)
    h = config_hash(cfg, step, inputs)
    previous = read_result(workdir, step)
    if not force and previous and previous.get("status") == "ok":
        if previous.get("config_hash") == h:
            ctx.log(f"outputs already present for config hash {h}: skipping")
            return EXIT_OK
        ctx.log(f"outputs present for hash {previous.get('config_hash')}, now {h} (config, code, data or model "
                "changed): running again")
    if lead:
        (ctx.out / RESULT_FILE).unlink(missing_ok=True)
        (ctx.out / ERROR_FILE).unlink(missing_ok=True)
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
        if ranks > 1:  # steps/distributed.py launch reports the first rank's failure
            distributed.record_failure(ctx.out, err)
            return EXIT_RETRYABLE if retryable else EXIT_DETERMINISTIC
        try:
            write_json_atomic(ctx.out / ERROR_FILE, err)
        except OSError:
            pass
        print(error_line(step, err["type"], message, retryable), flush=True)
        return EXIT_RETRYABLE if retryable else EXIT_DETERMINISTIC
    finished = time.time()
    if not lead:
        return EXIT_OK
    result = {
        "step": step,
        "config": cfg.name,
        "config_hash": h,
        "inputs": inputs,
        "status": "ok",
        "metrics": metrics,
        "outputs": ctx.outputs,
        "started_at": started,
        "finished_at": finished,
        "seconds": round(finished - started, 3),
        "device": _device(),
    }
    write_json_atomic(ctx.out / RESULT_FILE, result)
    ctx.log(f"done in {finished - started:.1f}s")
    return EXIT_OK
