"""What the run spends: one budget over every machine the run paid for, the budget check (per
output line and on a timer), the bytes copied home, the cost table's rows.

The meters (tasks/budget.py) bill each machine's whole life, from creation until its destroy is
confirmed; `RunBudget` adds them up with the instances of failed start attempts and the bandwidth.
The flow opens one per run (`open_budget`) and registers each machine it rents; the tasks of the
same flow-run process find it by the lease's label (`check_budget`, `record_bytes_home`).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

from contract.config import RunConfig
from contract.workload import run_workload
from infra.machines.archive import MAX_BYTES
from infra.machines.machine import Lease
from infra.run_estimate import expected_home_bytes

from .budget import BudgetExceeded, BudgetTimer, CostMeter, RunBudget

__all__ = ["BudgetExceeded", "CopyHomeRefused", "RunBudget", "open_budget", "check_budget",
           "record_bytes_home", "record_bytes_down", "copy_home_cap", "charge_as_it_arrives",
           "watch_budget", "budget_rows", "estimate_rows", "total_usd", "total_seconds"]

COPY_SLACK, COPY_FLOOR = 1.5, 256 * 10**6  # a copy home may exceed its expected bytes by this much
_budgets: dict[str, RunBudget] = {}  # lease label -> the run's budget, in this flow-run process
_lock = threading.Lock()


def open_budget(cfg: RunConfig) -> RunBudget:
    return RunBudget(cfg.machine.max_cost_usd)


def register(budget: RunBudget, lease: Lease) -> CostMeter:
    """A rented machine joins the run's budget (with the failed starts its launch reported)."""
    meter = budget.add_machine(lease)
    with _lock:
        _budgets[lease.label] = budget
    return meter


def forget(budget: RunBudget) -> None:
    with _lock:
        for label in [k for k, v in _budgets.items() if v is budget]:
            del _budgets[label]


def budget_for(lease: Optional[Lease]) -> Optional[RunBudget]:
    if lease is None:
        return None
    with _lock:
        return _budgets.get(lease.label)


def _run_budget(lease: Lease, cfg: RunConfig) -> RunBudget:
    """The run's budget; without one (a task run alone), a budget of this machine alone."""
    budget = budget_for(lease)
    if budget is None:
        budget = open_budget(cfg)
        budget.add_machine(lease)
    return budget


def check_budget(lease: Lease, cfg: RunConfig) -> None:
    """Raise BudgetExceeded once the run's spending (every machine, failed starts, bandwidth)
    crosses machine.max_cost_usd; without a run budget (a task run alone), this machine's life."""
    _run_budget(lease, cfg).check()


def record_bytes_home(lease: Optional[Lease], nbytes: int) -> None:
    """Bytes that landed at home from the machine: billed at its $/GB in the run's budget."""
    budget = budget_for(lease)
    if budget is not None and lease is not None and nbytes:
        budget.add_bytes_home(lease, nbytes)


class CopyHomeRefused(BudgetExceeded):
    """A copy home over its byte cap: refused before the transfer (the machine's own size report) or
    aborted during it (the bytes received); never retried."""

    retryable = False


def budget_left_usd(lease: Lease, cfg: RunConfig) -> float:
    return max(0.0, cfg.machine.max_cost_usd - _run_budget(lease, cfg).total_usd())


def copy_home_cap(lease: Optional[Lease], cfg: Optional[RunConfig], what: str) -> tuple[int, str]:
    """The most bytes one copy home of `what` (a step, or "checkpoint") may move, and why: the bytes
    the run's estimate expects for it (infra/run_estimate.py) x COPY_SLACK plus COPY_FLOOR, and no
    more than what the budget left pays at the machine's inet_up_cost; whichever is smaller."""
    caps = [(MAX_BYTES, f"the {MAX_BYTES / 1e9:g} GB ceiling")]
    if lease is None or cfg is None:
        return caps[0]
    expected = expected_home_bytes(run_workload(cfg), what)
    per_gb = lease.inet_up_cost
    left = budget_left_usd(lease, cfg)
    if expected is not None:
        caps.append((int(expected * COPY_SLACK + COPY_FLOOR),
                     f"{COPY_SLACK:g}x the {expected / 1e9:.3g} GB expected + {COPY_FLOOR / 1e6:g} MB"))
    if per_gb > 0:
        caps.append((int(left / per_gb * 1e9), f"${left:.4f} of budget left at ${per_gb:g}/GB"))
    return min(caps)


def charge_as_it_arrives(lease: Optional[Lease], cfg: Optional[RunConfig], cap: int, why: str,
                         what: str) -> Callable[[int], None]:
    """An `on_bytes` for Machine.get: each chunk received is billed at once (the run's budget sees it
    while the transfer runs), the budget is checked, and the transfer is aborted past `cap`."""
    received = [0]

    def on_bytes(n: int) -> None:
        received[0] += n
        record_bytes_home(lease, n)
        if received[0] > cap:
            raise CopyHomeRefused(f"copy home of {what} aborted: {received[0]} bytes received, over its cap of "
                                  f"{cap} bytes ({why}); raise machine.max_cost_usd or rent a host with a lower "
                                  "inet_up_cost (machine.vast.max_inet_cost_per_gb)")
        if lease is not None and cfg is not None:
            check_budget(lease, cfg)

    return on_bytes


def record_bytes_down(lease: Optional[Lease], nbytes: int) -> None:
    """Bytes pushed to the machine: billed at its inet_down_cost in the run's budget."""
    budget = budget_for(lease)
    if budget is not None and lease is not None and nbytes:
        budget.add_bytes_down(lease, nbytes)


@contextmanager
def watch_budget(budget: RunBudget, cfg: RunConfig, on_exceeded: Callable[[], None],
                 log: Optional[Callable[[str], None]] = None) -> Iterator[BudgetTimer]:
    """Check the budget every machine.budget_check_every_s seconds while the block runs (silent
    commands print no line to check on); on crossing, `on_exceeded` stops the command."""
    with BudgetTimer(budget, cfg.machine.budget_check_every_s, on_exceeded, log) as timer:
        yield timer


def _meter_rows(meter: CostMeter, prefix: str, instance: Optional[int]) -> list[dict]:
    return [{"step": prefix + r["step"], "seconds": r["seconds"], "usd": r["usd"], "usd_per_hour": meter.dph,
             "instance": instance, "total": r["total"]} for r in meter.as_rows()]


def budget_rows(budget: RunBudget) -> list[dict]:
    """The cost table of the whole run: each machine's steps, idle time, bandwidth and total, then one
    row per failed start attempt (its life, creation to destroy). The rows with "total" true are the
    whole bills of the machines and attempts: `total_usd(rows)` is the run's."""
    rows: list[dict] = []
    several = len(budget.machines) > 1
    for no, meter in enumerate(budget.machines, start=1):
        rows += _meter_rows(meter, f"machine {no}: " if several else "", meter.instance_id)
    for meter in budget.failed_starts:
        state = "destroyed" if meter.destroyed_at is not None else "destroy NOT confirmed, still billing"
        rows.append({"step": f"failed start attempt, instance {meter.instance_id} ({state}): total",
                     "seconds": round(meter.elapsed_s(), 3), "usd": round(meter.total_usd(), 6),
                     "usd_per_hour": meter.dph, "instance": meter.instance_id, "total": True})
    return rows


def total_usd(rows: list[dict]) -> float:
    """The run's bill: the sum of the rows that are a machine's (or a failed start's) whole bill."""
    return sum(r["usd"] for r in rows if r.get("total"))


def total_seconds(rows: list[dict]) -> float:
    """The machines' lives (and the failed starts'), added up."""
    return sum(r["seconds"] for r in rows if r.get("total"))


def estimate_rows(estimate: dict, costs: list[dict], train: Optional[dict] = None) -> list[dict]:
    """The pre-rent estimate beside what the run cost, for the cost table (after the run): the estimate,
    and actual minus estimate (hours and dollars). With the train step's metrics, the training speed the
    estimate assumed beside the one measured. None of them is a "total" row: `total_usd` skips them."""
    if not estimate or "estimated_usd" not in estimate:
        return []
    hours = float(estimate.get("planned_hours") or 0)
    actual_s = total_seconds(costs)
    basis = estimate.get("basis", "$/h x planned hours")
    where = f" on {estimate['gpu_name']}" if estimate.get("gpu_name") else ""
    rows = [{"step": f"estimate before renting{where} ({basis})", "seconds": round(hours * 3600, 1),
             "usd": estimate["estimated_usd"], "usd_per_hour": estimate.get("dph"), "instance": None, "total": False},
            {"step": "actual minus estimate", "seconds": round(actual_s - hours * 3600, 1),
             "usd": round(total_usd(costs) - estimate["estimated_usd"], 6), "usd_per_hour": None, "instance": None,
             "total": False}]
    expected, measured = estimate.get("expected_samples_per_s"), (train or {}).get("samples_per_s")
    if expected and measured:
        n, ranks = int(estimate.get("num_gpus") or 1), int((train or {}).get("world_size") or 1)
        rows.append({"step": f"training samples/s: expected {expected:g} with {n} GPU(s) ({estimate.get('speed_source')}), "
                             f"measured {measured:g} with {ranks} rank(s) (steady state; {measured / ranks:g} per rank)",
                     "seconds": (train or {}).get("first_step_s"), "usd": None, "usd_per_hour": None, "instance": None,
                     "total": False})
    return rows
