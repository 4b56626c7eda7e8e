"""What a rented machine costs: $/h (dph_total, GPU + storage) times its life, from creation
until its destroy is confirmed; split per step; checked against a budget cap."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

from .machine import Lease


class BudgetExceeded(RuntimeError):
    """Spending crossed machine.max_cost_usd: the caller tears the machine down."""


@dataclass
class CostMeter:
    dph: float
    created_at: float
    max_cost_usd: Optional[float] = None
    label: str = ""
    destroyed_at: Optional[float] = None
    steps: list[dict] = field(default_factory=list)
    clock: Callable[[], float] = time.time

    @classmethod
    def from_lease(cls, lease: Lease, max_cost_usd: Optional[float] = None,
                   clock: Callable[[], float] = time.time) -> "CostMeter":
        return cls(dph=lease.dph_total, created_at=lease.created_at or clock(), max_cost_usd=max_cost_usd,
                   label=lease.label, clock=clock)

    def _usd(self, seconds: float) -> float:
        return self.dph * max(0.0, seconds) / 3600.0

    def elapsed_s(self) -> float:
        end = self.destroyed_at if self.destroyed_at is not None else self.clock()
        return max(0.0, end - self.created_at)

    def total_usd(self) -> float:
        """Billed so far: the whole life, idle time between steps included."""
        return self._usd(self.elapsed_s())

    @contextmanager
    def step(self, name: str) -> Iterator[dict]:
        """Record a step's seconds and dollars (also when it fails)."""
        row = {"step": name, "started_at": self.clock(), "seconds": 0.0, "usd": 0.0, "ok": False}
        try:
            yield row
            row["ok"] = True
        finally:
            row["seconds"] = round(self.clock() - row["started_at"], 3)
            row["usd"] = round(self._usd(row["seconds"]), 6)
            self.steps.append(row)

    def destroyed(self, at: Optional[float] = None) -> None:
        """The destroy was confirmed: billing stops here."""
        self.destroyed_at = at if at is not None else self.clock()

    def over_budget(self) -> bool:
        return self.max_cost_usd is not None and self.total_usd() > self.max_cost_usd

    def check_budget(self) -> None:
        if self.over_budget():
            raise BudgetExceeded(f"budget cap crossed: ${self.total_usd():.4f} spent on {self.label or 'the machine'} "
                                 f"(${self.dph:.3f}/h for {self.elapsed_s() / 3600:.2f} h), machine.max_cost_usd is "
                                 f"${self.max_cost_usd:.4f}; tear the machine down")

    def as_rows(self) -> list[dict]:
        """Plain rows for a table artifact: each step, the time outside steps, and the total."""
        rows = [{"step": s["step"], "seconds": s["seconds"], "usd": s["usd"], "ok": s["ok"]} for s in self.steps]
        in_steps = sum(s["seconds"] for s in self.steps)
        other = max(0.0, self.elapsed_s() - in_steps)
        rows.append({"step": "outside steps (boot, idle, teardown)", "seconds": round(other, 3),
                     "usd": round(self._usd(other), 6), "ok": True})
        rows.append({"step": "total", "seconds": round(self.elapsed_s(), 3), "usd": round(self.total_usd(), 6),
                     "ok": self.destroyed_at is not None})
        return rows
