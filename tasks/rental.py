"""Tasks that rent a machine, prepare it and give it back, and the connection each flow-run process
keeps to it. Everything they pass is plain data."""
from __future__ import annotations

import threading
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.concurrency.sync import concurrency
from prefect.tasks import exponential_backoff

from contract.catalogue import CHECKPOINT_DIR, GPUS_PREFIX, marked_json, REDERIVED, RESUMING_STEP, STEPS
from contract.config import RunConfig
from contract.disk import disk_plan
from contract.layout import PUSHED_CODE, REMOTE_CODE, REMOTE_CONFIG, REMOTE_WORK, REPO_ROOT, REQUIREMENTS
from contract.remote_env import steps_python
from contract.result_file import is_done
from contract.workload import run_workload
from infra.backends import registry
from infra.machines.machine import Lease, Machine
from infra.machines.streams import collect_files

from . import secrets
from .billing import record_bytes_down
from .gpu_ranks import counted_gpus
from .retry import retry_transient
from .step_output import StepOutput

GPU_LIMIT = "vast-gpus"  # the global concurrency limit that caps rented GPUs

_connections: dict[str, Machine] = {}
_lock = threading.Lock()


def machine_for(lease: Lease, cfg: RunConfig, fresh: bool = False) -> Machine:
    """A connected Machine for this lease, reused across tasks in one flow-run process."""
    key = f"{lease.backend}:{lease.instance_id}:{lease.label}"
    with _lock:
        m = _connections.get(key)
        if m is None or fresh:
            if m is not None:
                m.close()
            m = registry.connect(lease, timeout=cfg.machine.ssh_timeout_s)
            _connections[key] = m
        return m


def forget_machine(lease: Lease) -> None:
    key = f"{lease.backend}:{lease.instance_id}:{lease.label}"
    with _lock:
        m = _connections.pop(key, None)
    if m is not None:
        try:
            m.close()
        except Exception:
            pass


def pre_rent_estimate(cfg: RunConfig, creds: Any) -> dict:
    """The offer that would be rented, every step's hours and bytes on it (registry.price_estimate)
    and the disk the run needs there (contract/disk.py; validate_config refused a smaller min_disk_gb)."""
    est = registry.price_estimate(cfg.machine, creds, workload=run_workload(cfg))
    plan = disk_plan(cfg)
    est["disk"] = {"needed_gb": plan.needed_gb, "parts": plan.parts, "plan": plan.describe(),
                   "rented_gb": est.get("rented_disk_gb")}  # a backend that rents a disk size says which
    return est


@task(name="estimate cost", retries=3, retry_delay_seconds=exponential_backoff(10), retry_jitter_factor=0.5,
      retry_condition_fn=retry_transient)
def estimate_cost(cfg: RunConfig) -> dict:
    """Before anything is rented, on the offer that would be rented (the cheapest run): every step's
    hours x $/h and bytes x $/GB (infra/run_estimate.py), or $/h x machine.planned_hours when the
    run's size or the GPU's speed is unknown. Refused, with the table, over machine.max_cost_usd."""
    est = pre_rent_estimate(cfg, secrets.credentials(cfg.machine.backend))
    log = _logger()
    log.info("estimate: %s", ", ".join(f"{k}={v}" for k, v in est.items() if not isinstance(v, (dict, list))))
    table = estimate_table(est)
    if table:
        log.info("estimate per step on %s:\n%s", est.get("gpu_name"), table)
    if est.get("left_out"):
        log.info("offers the market filters left out: %s", est["left_out"])
    if est.get("estimated_usd", 0) > cfg.machine.max_cost_usd:
        raise ValueError(
            f"estimated cost ${est['estimated_usd']:.2f} exceeds machine.max_cost_usd ${cfg.machine.max_cost_usd:.2f}: "
            f"({est.get('basis', '$/h x planned hours')}, {est.get('planned_hours')} h at ${est.get('dph', 0):.3f}/h"
            + (f", {est.get('bytes_home', 0) / 1e9:.1f} GB home at ${est.get('inet_up_cost', 0):g}/GB and "
               f"{est.get('bytes_down', 0) / 1e9:.1f} GB down at ${est.get('inet_down_cost', 0):g}/GB" if table else "")
            + ")" + (f"\n{table}\n" if table else ": ")
            + "raise the cap, train on fewer samples (train.epochs, data.max_samples), evaluate fewer clips "
            "(data.max_eval_samples), or lower machine.planned_hours, machine.vast.max_dph or "
            "machine.vast.max_inet_cost_per_gb")
    return est


def estimate_table(est: dict) -> str:
    """The estimate's step rows as a plain text table (empty when the estimate has none)."""
    rows = est.get("rows") or []
    if not rows:
        return ""
    lines = [f"{'step':<9} {'hours':>7} {'machine $':>10} {'GB down':>8} {'GB home':>8} {'bandwidth $':>11} {'$':>9}  basis"]
    for r in rows:
        lines.append(f"{r['step']:<9} {r['hours']:>7.3f} {r['machine_usd']:>10.4f} {r['bytes_down'] / 1e9:>8.2f} "
                     f"{r['bytes_home'] / 1e9:>8.2f} {r['bandwidth_usd']:>11.4f} {r['usd']:>9.4f}  {r['basis']}")
    lines.append(f"{'total':<9} {est['planned_hours']:>7.3f} {'':>10} {est['bytes_down'] / 1e9:>8.2f} "
                 f"{est['bytes_home'] / 1e9:>8.2f} {est['bandwidth_usd']:>11.4f} {est['estimated_usd']:>9.4f}")
    disk = est.get("disk")
    if disk:
        rented = (f"; rented {disk['rented_gb']:g} GB (machine.vast.min_disk_gb: offers with less disk_space are "
                  "not rented)" if disk.get("rented_gb") else "")
        lines.append(f"disk on the machine: {disk['plan']}{rented}")
    return "\n".join(lines)


GPU_LIMIT_DEFAULT = 1  # slots of a GPU_LIMIT this code creates because none existed


def ensure_gpu_limit(log=None) -> bool:
    """Create the GPU_LIMIT global concurrency limit (GPU_LIMIT_DEFAULT slots) when it does not exist;
    an existing one is left as its owner set it. Returns whether it was created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(GPU_LIMIT)
            return False
        except ObjectNotFound:
            pass
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=GPU_LIMIT_DEFAULT))
        except ObjectAlreadyExists:  # another flow run created it first
            return False
    (log or _logger()).warning("global concurrency limit %r did not exist: created it with %d slot(s) "
                               "(raise it with `prefect gcl update %s --limit N`)", GPU_LIMIT, GPU_LIMIT_DEFAULT, GPU_LIMIT)
    return True


def _logger():
    try:
        return get_run_logger()
    except Exception:  # noqa: BLE001 - outside a flow or task run
        import logging

        return logging.getLogger(__name__)


def gpu_slot(cfg: RunConfig) -> AbstractContextManager:
    """Holds one slot of the GPU_LIMIT while a rented machine is in use (hosts we own need none).
    The limit is created when missing and taken strictly: without it nothing would be limited."""
    if not registry.backend(cfg.machine.backend).needs_gpu_slot:
        return nullcontext()
    ensure_gpu_limit()
    return concurrency(GPU_LIMIT, occupy=1, strict=True)


@task(name="rent machine", retries=2, retry_delay_seconds=exponential_backoff(10), retry_jitter_factor=0.5,
      retry_condition_fn=retry_transient)
def rent_machine(cfg: RunConfig, label: str, run_dir: Path) -> Lease:
    log = get_run_logger()
    collect_files(REPO_ROOT, PUSHED_CODE)  # what push_code sends is known (a git checkout) before anything is rented
    lease = registry.acquire(cfg.machine, label, run_dir, secrets.credentials(cfg.machine.backend), log=log.info,
                             workload=run_workload(cfg))
    log.info("machine %s: %s x%s at $%.3f/h (%s)", lease.label, lease.gpu_name or "cpu", lease.num_gpus,
             lease.dph_total, lease.location or lease.backend)
    return lease


@task(name="push code", retries=3, retry_delay_seconds=exponential_backoff(5), retry_jitter_factor=0.5,
      retry_condition_fn=retry_transient)
def push_code(lease: Lease, cfg: RunConfig, local_work: Path) -> dict:
    """Send our code and the resolved config; also what came home for the current hash, so finished
    steps skip themselves on a new machine: the steps done for it (not the re-derived ones) and,
    while training is unfinished, its checkpoints copied home (a checkpoint of another config hash
    is set aside by the train step, never resumed). Outputs of another hash are never sent."""
    log = get_run_logger()
    m = machine_for(lease, cfg)
    t0 = time.time()
    sent = m.put(REPO_ROOT, REMOTE_CODE, include=PUSHED_CODE) or 0
    m.run(["mkdir", "-p", REMOTE_WORK])
    m.write_text(REMOTE_CONFIG, cfg.to_yaml())
    restored = [s for s in STEPS if s not in REDERIVED and is_done(cfg, local_work, s)]
    if RESUMING_STEP not in restored and (local_work / RESUMING_STEP / CHECKPOINT_DIR).is_dir():
        restored.append(f"{RESUMING_STEP}/{CHECKPOINT_DIR}")
    if restored:
        sent += m.put(local_work, REMOTE_WORK, include=restored, respect_gitignore=False) or 0
        log.info("restored earlier outputs on the machine: %s", ", ".join(restored))
    record_bytes_down(lease, sent)  # billed at the host's inet_down_cost
    log.info("code pushed in %.1fs (%.1f MB)", time.time() - t0, sent / 1e6)
    return {"seconds": round(time.time() - t0, 2), "restored": restored}


def remote_python(lease: Lease, cfg: RunConfig) -> str:
    """The interpreter steps run with on this machine: the venv setup_environment made (named relative
    to REMOTE_CODE, where steps run), or, where the backend sets up nothing (local), its own."""
    if not registry.sets_up_environment(lease):
        return registry.python(lease, cfg.machine)
    return steps_python((REPO_ROOT / REQUIREMENTS).read_bytes(), cfg.machine.gpu)


@task(name="set up environment", retries=2, retry_delay_seconds=exponential_backoff(10), retry_jitter_factor=0.5,
      retry_condition_fn=retry_transient)
def setup_environment(lease: Lease, cfg: RunConfig) -> dict:
    """The steps' own venv on the machine (`python -m steps.bootstrap` with the image's python:
    the torch build and onnxruntime(-gpu) for machine.gpu, installed once per requirements hash, then
    checked: CUDA usable when the run needs a GPU). A machine that cannot be made usable fails here,
    deterministically (StepFailed "setup", not retried), and the flow's `finally` destroys it."""
    log = get_run_logger()
    if not registry.sets_up_environment(lease):
        log.info("backend %s: steps run with %s, nothing to set up", lease.backend, remote_python(lease, cfg))
        return {"venv": None}
    m = machine_for(lease, cfg)
    t0 = time.time()
    output = StepOutput("setup", log)
    gpus: dict = {}

    def on_line(line: str) -> None:
        output.line(line)
        log.info(line)
        try:
            gpus.update(marked_json(line, GPUS_PREFIX) or {})
        except ValueError as e:
            log.warning("a GPUS line from the machine was ignored: %s", e)

    code = m.run([registry.python(lease, cfg.machine), "-m", "steps.bootstrap", "--gpu", cfg.machine.gpu],
                 cwd=REMOTE_CODE, env={"PYTHONUNBUFFERED": "1"}, on_line=on_line, timeout=3600, check=False)
    if code != 0:
        raise output.failed(code)
    return {"venv": remote_python(lease, cfg), "seconds": round(time.time() - t0, 1), "gpus": counted_gpus(gpus)}


@task(name="destroy machine", retries=5, retry_delay_seconds=exponential_backoff(5), retry_jitter_factor=0.5)
def destroy_machine(lease: Lease) -> dict:
    """Destroy and confirm. Never just stop: stopped instances keep billing."""
    log = get_run_logger()
    forget_machine(lease)
    t0 = time.time()
    gone = registry.release(lease, secrets.credentials(lease.backend))
    log.info("machine %s released (confirmed gone: %s)", lease.label, gone)
    if gone and delete_run_key(lease):
        log.info("machine %s: its per-run SSH key pair was deleted", lease.label)
    return {"destroyed_at": time.time(), "confirmed": bool(gone), "seconds": round(time.time() - t0, 2)}


def delete_run_key(lease: Lease) -> bool:
    """Delete the per-run SSH key pair of a destroyed machine (True if one was deleted).

    Only a key the backend made for this run (`lease.run_key_dir`, vast) and only once the
    machine is confirmed gone: nothing can use it any more. A machine rented again within the run
    (a lost machine replaced) gets a fresh pair from infra/backends/keys.py, so deleting here costs nothing.
    A key the user owns (backend ssh) is never touched. If the flow process dies before this, the
    key stays in the run directory (runs/<name>/ssh/<label>/) until deleted by hand."""
    key_dir = lease.run_key_dir
    if not key_dir or not lease.key_path:
        return False
    key_dir, private = Path(key_dir), Path(lease.key_path)
    if private.parent != key_dir:  # not the pair this backend made: leave it alone
        return False
    deleted = False
    for path in (private, private.with_name(private.name + ".pub")):
        try:
            path.unlink()
            deleted = True
        except FileNotFoundError:
            pass
    try:
        key_dir.rmdir()  # only when empty
    except OSError:
        pass
    return deleted


def machine_gone(lease: Lease) -> bool:
    """Whether the provider answered that it no longer runs the machine. An answer that cannot be had
    (its API down, a timeout) is not "gone": a healthy machine is never given up on a hiccup; the step's
    own retry tries it again, and asks again."""
    try:
        return not registry.is_alive(lease, secrets.credentials(lease.backend))
    except Exception:
        return False
