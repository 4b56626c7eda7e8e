"""The task that runs one on-machine step (python -m steps <step>) and brings its outputs home."""
from __future__ import annotations

import json
import math
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.tasks import exponential_backoff

from contract.catalogue import (BULK_OUTPUTS, CHECKPOINT_DIR, OUTPUT_CAP_BYTES, OUTPUT_NAME,
                                PROGRESS_PREFIX, REDERIVED, RESUMING_STEP, checkpoint_number, marked_json)
from contract.config import RunConfig
from contract.layout import REMOTE_CODE, REMOTE_CONFIG, REMOTE_WORK
from contract.machine_config import STEP_ATTEMPTS
from contract.result_file import ERROR_FILE, config_hash, is_done, read_result
from contract.workload import run_workload
from infra.backends import registry
from infra.gpu_count import ranks_used
from infra.gpu_speed import expected_speed
from infra.machines.machine import Lease, Machine, TransientMachineError
from infra.run_estimate import clock

from .billing import BudgetExceeded, CopyHomeRefused, charge_as_it_arrives, check_budget, copy_home_cap
from .gpu_ranks import cpu_ranks
from .rental import forget_machine, machine_for, machine_gone, remote_python
from .retry import StepFailed, retry_transient
from .revisions import hub_endpoint_env
from .step_output import StepOutput


class MachineLost(RuntimeError):
    """The machine stopped answering and the provider no longer runs it (preempted, vanished):
    retrying on it is pointless; the flow rents another one and resumes."""

    retryable = False


def progress_description(step: str, total: int, event: dict) -> str:
    """What a progress artifact says: steps out of total; for training, the first step (compilation
    included) apart from the steady-state speed (steps/train_loop.py Trainer.speed)."""
    text = f"{step}: steps done out of {total}"
    if event.get("first_step_s") is not None:
        text += f"; first step {event['first_step_s']:g} s" + (" (compiling)" if event.get("compiled") else "")
    if event.get("samples_per_s") is not None:
        text += f"; steady state {event['samples_per_s']:g} samples/s"
    return text


def _progress_number(event: dict, key: str) -> Optional[float]:
    """A PROGRESS field as a finite number >= 0 (None when absent); ValueError for anything else."""
    value = event.get(key)
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an integer past float's range
            number = math.inf
        if math.isfinite(number) and number >= 0:
            return number
    raise ValueError(f"PROGRESS {key!r} is {str(value)[:40]!r}, not a finite number >= 0")


class _Progress:
    """Turns PROGRESS lines into a Prefect progress artifact, updated at most every 2 seconds."""

    def __init__(self, step: str):
        self.step, self.artifact_id, self.last = step, None, 0.0

    def update(self, event: dict) -> None:
        """ValueError (before anything is shown) when a field home reads has the wrong type."""
        numbers = {k: _progress_number(event, k) for k in ("total", "done", "first_step_s", "samples_per_s")}
        event = {**event, **numbers}
        total = max(1, int(numbers["total"] or 1))
        pct = min(100.0, 100.0 * (numbers["done"] or 0) / total)
        now = time.time()
        description = progress_description(self.step, total, event)
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(
                progress=pct, key=f"{self.step}-progress", description=description)
        elif now - self.last >= 2 or pct >= 100:
            update_progress_artifact(self.artifact_id, progress=pct, description=description)
        else:
            return
        self.last = now


class CheckpointSync:
    """Copies the newest complete training checkpoint home every `every_s` seconds, on its own
    connection, so a lost machine costs at most that much training."""

    def __init__(self, lease: Lease, cfg: RunConfig, local_work: Path, every_s: float, log):
        self.lease, self.cfg, self.local, self.every, self.log = lease, cfg, local_work, every_s, log
        self.stopping = threading.Event()
        self.synced: Optional[str] = None
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=60)

    def _loop(self):
        m: Optional[Machine] = None
        while not self.stopping.wait(self.every):
            try:
                m = m or registry.connect(self.lease, timeout=self.cfg.machine.ssh_timeout_s)
                self.sync(m)
            except BudgetExceeded as e:  # over the cap or the budget: trying again would bill again
                self.log.error("checkpoint copy-back stopped: %s", e)
                break
            except Exception as e:  # never kill the step for a failed copy; try again later
                self.log.warning("checkpoint copy-back failed (will retry): %s", e)
                m = None
        if m is not None:
            m.close()

    def sync(self, m: Machine) -> None:
        remote = f"{REMOTE_WORK}/{RESUMING_STEP}/{CHECKPOINT_DIR}"
        listing: list[str] = []
        m.run(["ls", "-1", remote], on_line=listing.append, check=False)
        numbered = {checkpoint_number(x.strip()): x.strip() for x in listing}  # anything else is ignored
        numbered.pop(None, None)
        if not numbered or numbered[max(numbered)] == self.synced:
            return
        newest = numbered[max(numbered)]
        dest = self.local / RESUMING_STEP / CHECKPOINT_DIR
        tmp = dest / f".{newest}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        cap, why = copy_home_cap(self.lease, self.cfg, "checkpoint")
        reported = remote_sizes(m, remote).get(newest, 0)
        if reported > cap:
            raise CopyHomeRefused(f"checkpoint {newest} not copied home: the machine reports {reported} bytes, "
                                  f"over its cap of {cap} bytes ({why})")
        m.get(f"{remote}/{newest}", tmp, allow=OUTPUT_NAME, max_bytes=OUTPUT_CAP_BYTES[RESUMING_STEP],
              on_bytes=charge_as_it_arrives(self.lease, self.cfg, cap, why, f"checkpoint {newest}"))
        shutil.rmtree(dest / newest, ignore_errors=True)
        tmp.rename(dest / newest)
        for old in dest.iterdir():
            if checkpoint_number(old.name) is not None and old.name != newest:
                shutil.rmtree(old, ignore_errors=True)
        self.synced = newest
        self.log.info("checkpoint %s copied home", newest)


def tree_bytes(path: Path) -> int:
    """Bytes of the regular files under path (what a copy home landed: billed as bandwidth)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def train_clock(lease: Lease, cfg: RunConfig) -> Optional[dict]:
    """The train step's timeout and checkpoint cadence on this machine's GPU (infra/run_estimate.py
    clock), or None when its speed or the run's size is unknown (then the config's values stand)."""
    w = run_workload(cfg)
    speed = (expected_speed(lease.gpu_name, w, ranks_used(lease.num_gpus or 1, w.grad_accum))
             if w is not None and w.samples and lease.gpu_name else None)
    if speed is None:
        return None
    return clock(w, speed["samples_per_s"], cfg.machine.step_timeout_s, lease.gpu_name)


def remote_sizes(m: Machine, remote_dir: str) -> dict[str, int]:
    """The machine's own word on the bytes of each top-level entry of remote_dir (`du`): used to refuse
    a copy home before it starts, never trusted alone (the transfer is capped as it runs)."""
    sizes: dict[str, int] = {}

    def on_line(line: str) -> None:
        size, _, name = line.rstrip("\n").partition("\t")
        if size.isdigit() and name and "/" not in name:
            sizes[name] = sizes.get(name, 0) + int(size)

    m.run(["sh", "-c", 'cd "$1" 2>/dev/null || exit 0; for f in * .[!.]*; do [ -e "$f" ] && '
           'du -s -B1 --apparent-size -- "$f"; done; true', "sh", remote_dir], on_line=on_line, check=False)
    return sizes


def fetch_outputs(m: Machine, step: str, local_work: Path, succeeded: bool, cap: Optional[int] = None,
                  on_bytes=None, why: str = "") -> int:
    """Bring a step's outputs home as one checked archive (infra/machines/archive.py): everything after a
    failure (nothing produced is lost) unless its bulk outputs would pass `cap` (then they stay on
    the machine), all but its bulk outputs after a success (dropped at home if the machine sends them
    anyway), at most OUTPUT_CAP_BYTES[step] unpacked. With a `cap` (bytes; tasks/billing.py
    copy_home_cap), the machine's size report is checked before anything moves and the transfer is
    aborted once it receives more (`on_bytes` bills each chunk as it arrives): CopyHomeRefused.
    The folder at home is replaced only once every member passed. Returns the bytes that came home."""
    skip = BULK_OUTPUTS.get(step, ()) if succeeded or step in REDERIVED else ()
    if cap is not None:
        sizes = remote_sizes(m, f"{REMOTE_WORK}/{step}")
        reported = sum(v for k, v in sizes.items() if k not in skip)
        if reported > cap and not succeeded:  # a failed step's bulk stays behind rather than break the cap
            skip = tuple(BULK_OUTPUTS.get(step, ()))
            reported = sum(v for k, v in sizes.items() if k not in skip)
        if reported > cap:
            raise CopyHomeRefused(f"copy home of {step} refused before the transfer: the machine reports "
                                  f"{reported} bytes, over its cap of {cap} bytes ({why}); raise "
                                  "machine.max_cost_usd or rent a host with a lower inet_up_cost "
                                  "(machine.vast.max_inet_cost_per_gb)")
    dest = local_work / step
    tmp = local_work / f".{step}.incoming-{uuid.uuid4().hex[:8]}"
    try:
        m.get(f"{REMOTE_WORK}/{step}", tmp, allow=OUTPUT_NAME, exclude=skip, max_bytes=OUTPUT_CAP_BYTES[step],
              on_bytes=on_bytes)
        landed = tree_bytes(tmp)
        if (dest / CHECKPOINT_DIR).is_dir() and not (tmp / CHECKPOINT_DIR).exists():
            (dest / CHECKPOINT_DIR).rename(tmp / CHECKPOINT_DIR)  # keep what CheckpointSync brought home
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return landed


@task(name="step", task_run_name="{step}", retries=STEP_ATTEMPTS - 1, retry_delay_seconds=exponential_backoff(10),
      retry_jitter_factor=0.5, retry_condition_fn=retry_transient)
def run_remote_step(lease: Lease, cfg: RunConfig, step: str, local_work: Path) -> dict:
    """Run `python -m steps <step>` on the machine, streaming its lines into the Prefect logs."""
    log = get_run_logger()
    if is_done(cfg, local_work, step) and step not in REDERIVED:  # those must exist on this machine
        log.info("%s already done for config hash %s: skipped", step, config_hash(cfg, step))
        return read_result(local_work, step)
    check_budget(lease, cfg)
    argv = [remote_python(lease, cfg), "-m", "steps", step, "--config", f"../{Path(REMOTE_CONFIG).name}",
            "--workdir", f"../{Path(REMOTE_WORK).name}"]
    timeout = cfg.machine.step_timeout_s
    if step == RESUMING_STEP:
        argv.append("--resume")
        clk = train_clock(lease, cfg)
        if clk is not None:
            timeout = clk["timeout_s"]
            argv += ["--save-every", str(clk["save_every"])]
            log.info("train on %s: expected %.0f s, timeout %.0f s, a checkpoint every %d steps (at most %.0f s of "
                     "training old)", lease.gpu_name, clk["expected_s"], timeout, clk["save_every"], clk["checkpoint_age_s"])
        ranks = cpu_ranks(lease, cfg)
        if ranks is not None:
            argv += ["--cpu-ranks", str(ranks)]
            log.info("train with %d CPU processes: this machine lists %d GPUs and machine.gpu is none", ranks, ranks)
    progress = _Progress(step)
    output = StepOutput(step, log)

    def on_line(line: str) -> None:
        line = line.rstrip("\n")
        output.line(line)
        log.info(line)
        try:  # a marker line home cannot use is the machine's problem: logged, never fatal here
            event = marked_json(line, PROGRESS_PREFIX)
            if event is not None:
                progress.update(event)
        except ValueError as e:
            log.warning("a marker line from the machine was ignored: %s", e)
        check_budget(lease, cfg)

    sync = (CheckpointSync(lease, cfg, local_work, cfg.machine.checkpoint_sync_every_s, log)
            if step == RESUMING_STEP else None)
    if sync:
        sync.start()
    try:
        m = machine_for(lease, cfg)
        try:
            code = m.run(argv, cwd=REMOTE_CODE, env={"PYTHONUNBUFFERED": "1", **hub_endpoint_env()}, on_line=on_line,
                         timeout=timeout, check=False)
        finally:
            if sync:
                sync.stop()
        cap, why = copy_home_cap(lease, cfg, step)
        fetch_outputs(m, step, local_work, succeeded=code == 0, cap=cap, why=why,
                      on_bytes=charge_as_it_arrives(lease, cfg, cap, why, step))
    except TransientMachineError as exc:
        forget_machine(lease)  # a retry starts from a fresh connection
        check_budget(lease, cfg)  # the budget timer closed the connection: a budget stop, not a lost machine
        if machine_gone(lease):  # do not spend retries waiting on a machine that is gone
            raise MachineLost(f"machine {lease.label} is gone ({exc.__class__.__name__}: {exc})") from None
        raise
    if code != 0:
        home_err = local_work / step / ERROR_FILE
        if output.error and not home_err.is_file():  # e.g. a full disk could not hold it: keep the STEP_ERROR report
            home_err.parent.mkdir(parents=True, exist_ok=True)
            home_err.write_text(json.dumps(output.error, indent=2))
        raise output.failed(code)
    result = read_result(local_work, step)
    if not result:
        raise StepFailed(step, "the step exited 0 but wrote no result.json", False)
    return result
