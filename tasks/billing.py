"""What the run spends: one cost meter per rented machine, the budget check, the cost table's rows.

The meter (infra/cost.py) bills a machine's whole life, from creation until its destroy is confirmed.
"""
from __future__ import annotations

from contract.config import RunConfig
from infra.cost import CostMeter
from infra.machine import Lease


def open_meter(lease: Lease, cfg: RunConfig) -> CostMeter:
    return CostMeter.from_lease(lease, cfg.machine.max_cost_usd)


def check_budget(lease: Lease, cfg: RunConfig) -> None:
    """Raise BudgetExceeded once the machine's billed life crosses machine.max_cost_usd."""
    open_meter(lease, cfg).check_budget()


def cost_rows(lease: Lease, meter: CostMeter, machine_no: int) -> list[dict]:
    """Seconds and dollars per step, plus the rest of the billed life, for one machine."""
    prefix = f"machine {machine_no}: " if machine_no > 1 else ""
    return [{"step": prefix + r["step"], "seconds": r["seconds"], "usd": r["usd"], "usd_per_hour": lease.dph_total,
             "instance": lease.instance_id} for r in meter.as_rows()]


def total_usd(rows: list[dict]) -> float:
    return sum(r["usd"] for r in rows if r["step"].endswith("total"))
