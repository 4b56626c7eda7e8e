"""The remote part of a run: rent a machine, push, set up, run every step on it, and give it back.

A machine lost mid-run (preemption, vanished host) is replaced, up to MAX_MACHINES, and the work
resumes from what was copied home. One budget covers every machine of the run, the instances of
failed start attempts and the bytes copied home; it is checked on every output line and, while a
command is silent, on a timer. Each machine is destroyed in a `finally`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from prefect import get_run_logger

from contract.catalogue import STEPS
from contract.config import RunConfig
from infra.backends.base import ProviderError
from infra.machines.machine import Lease

from .billing import BudgetExceeded, budget_rows, forget, open_budget, register, watch_budget
from .gpu_ranks import with_counted_gpus
from .home_record import VERIFIED_STEP, write_record
from .remote_step import MachineLost, run_remote_step
from .rental import destroy_machine, forget_machine, gpu_slot, machine_gone, push_code, rent_machine, setup_environment
from .report import publish_cost_table
from .retry import is_transient

MAX_MACHINES = 3  # a run that loses its machine (preemption) rents a new one this many times at most


def _on_machine(cfg: RunConfig, lease: Lease, local_work: Path, results: dict, meter) -> None:
    """Push, set up, then each step in order; every step's outputs come home as it finishes."""
    with meter.step("push code"):
        push_code(lease, cfg, local_work)
    with meter.step("set up environment"):
        lease = with_counted_gpus(lease, setup_environment(lease, cfg))
    for step in STEPS:
        with meter.step(step):
            results[step] = run_remote_step(lease, cfg, step, local_work)
        if step != VERIFIED_STEP:  # outputs landed through infra/machines/archive.py; evaluate's: once the gate verified them
            write_record(cfg, local_work, step)


def run_on_machines(cfg: RunConfig, label: str, run_dir: Path, local_work: Path) -> tuple[dict, list[dict], Optional[Lease]]:
    """Every step on rented (or attached) machines: (results per step, cost rows, the last lease)."""
    log = get_run_logger()
    results: dict[str, dict] = {}
    lease: Optional[Lease] = None
    # One budget over every machine of the run, the instances of failed start attempts and the
    # bytes copied home; checked on every output line and, for silent commands, on a timer.
    budget = open_budget(cfg)
    try:
        with gpu_slot(cfg):
            for machine_no in range(1, MAX_MACHINES + 1):
                try:
                    lease = rent_machine(cfg, label, run_dir)
                except ProviderError as exc:  # the instances its failed starts created were billed too
                    budget.add_failed_starts(exc.failed_starts)
                    raise
                meter = register(budget, lease)
                try:
                    with watch_budget(budget, cfg, lambda lease=lease: forget_machine(lease), log.warning):
                        budget.check()
                        _on_machine(cfg, lease, local_work, results, meter)
                    break
                except Exception as exc:
                    if budget.exceeded is not None and not isinstance(exc, BudgetExceeded):
                        # the timer closed the connection under a command: a budget stop, not a lost machine
                        raise BudgetExceeded(budget.exceeded) from exc
                    lost = isinstance(exc, MachineLost) or (is_transient(exc) and machine_gone(lease))
                    if not lost or machine_no == MAX_MACHINES:
                        raise
                    log.warning("machine %s was lost (%s): renting another, resuming from what was copied home",
                                lease.label, type(exc).__name__)
                finally:
                    with meter.step("destroy machine"):
                        meter.destroyed(destroy_machine(lease)["destroyed_at"])
    except Exception:  # a failed run still shows what it spent, failed starts and bandwidth included
        try:
            publish_cost_table(cfg, budget_rows(budget))
        except Exception as e:  # never hide the run's own error
            log.warning("could not publish the cost table: %s", e)
        raise
    finally:
        forget(budget)
    costs = budget_rows(budget)
    return results, costs, lease
