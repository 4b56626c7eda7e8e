"""What a rented machine costs (`CostMeter`): $/h (dph_total, GPU + storage) times its life, from
creation until its destroy is confirmed, plus the bytes it sent home and was sent at its $/GB; split
per step. `RunBudget` is the run's one meter over every machine it paid for (failed start attempts
included) and the only place the cap (machine.max_cost_usd) is checked; `BudgetTimer` checks it on a
timer while a command is silent."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional

from infra.machines.machine import FailedStart, Lease


class BudgetExceeded(RuntimeError):
    """Spending crossed machine.max_cost_usd: the caller tears the machine down."""

    retryable = False


@dataclass
class CostMeter:
    dph: float
    created_at: float
    label: str = ""
    destroyed_at: Optional[float] = None
    steps: list[dict] = field(default_factory=list)
    clock: Callable[[], float] = time.time
    instance_id: Optional[int] = None
    usd_per_gb_home: float = 0.0  # the offer's inet_up_cost: bytes copied home leave the machine
    bytes_home: int = 0
    usd_per_gb_down: float = 0.0  # the offer's inet_down_cost: bytes pushed to the machine reach it
    bytes_down: int = 0

    @classmethod
    def from_lease(cls, lease: Lease, clock: Callable[[], float] = time.time) -> "CostMeter":
        return cls(dph=lease.dph_total, created_at=lease.created_at or clock(), label=lease.label, clock=clock, instance_id=lease.instance_id,
                   usd_per_gb_home=lease.inet_up_cost, usd_per_gb_down=lease.inet_down_cost)

    def _usd(self, seconds: float) -> float:
        return self.dph * max(0.0, seconds) / 3600.0

    def add_bytes_home(self, nbytes: int) -> None:
        """Bytes copied home from this machine (its outputs, checkpoints): billed per GB."""
        self.bytes_home += max(0, int(nbytes))

    def add_bytes_down(self, nbytes: int) -> None:
        """Bytes pushed to this machine (code, earlier outputs, checkpoints to resume): billed per GB."""
        self.bytes_down += max(0, int(nbytes))

    def bandwidth_usd(self) -> float:
        return self.bytes_home / 1e9 * self.usd_per_gb_home + self.bytes_down / 1e9 * self.usd_per_gb_down

    def elapsed_s(self) -> float:
        end = self.destroyed_at if self.destroyed_at is not None else self.clock()
        return max(0.0, end - self.created_at)

    def total_usd(self) -> float:
        """Billed so far: the whole life, idle time between steps included, and the bandwidth."""
        return self._usd(self.elapsed_s()) + self.bandwidth_usd()

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

    def as_rows(self) -> list[dict]:
        """Plain rows for a table artifact: each step, the time outside steps, and the total (the one
        row with "total" true: the machine's whole bill)."""
        rows = [{"step": s["step"], "seconds": s["seconds"], "usd": s["usd"], "ok": s["ok"]} for s in self.steps]
        in_steps = sum(s["seconds"] for s in self.steps)
        other = max(0.0, self.elapsed_s() - in_steps)
        rows.append({"step": "outside steps (boot, idle, teardown)", "seconds": round(other, 3),
                     "usd": round(self._usd(other), 6), "ok": True})
        if self.bytes_home:
            rows.append({"step": f"bandwidth: {self.bytes_home / 1e6:.1f} MB copied home at ${self.usd_per_gb_home:g}/GB",
                         "seconds": 0.0, "usd": round(self.bytes_home / 1e9 * self.usd_per_gb_home, 6), "ok": True})
        if self.bytes_down:
            rows.append({"step": f"bandwidth: {self.bytes_down / 1e6:.1f} MB pushed to the machine at "
                                 f"${self.usd_per_gb_down:g}/GB", "seconds": 0.0,
                         "usd": round(self.bytes_down / 1e9 * self.usd_per_gb_down, 6), "ok": True})
        rows = [{**r, "total": False} for r in rows]
        rows.append({"step": "total", "seconds": round(self.elapsed_s(), 3), "usd": round(self.total_usd(), 6),
                     "ok": self.destroyed_at is not None, "total": True})
        return rows


class RunBudget:
    """One budget over a run: every machine it rented (each a CostMeter), the instances of failed
    start attempts (billed from creation until their destroy, or until now when it was not
    confirmed), and the bytes each machine sent home. `check()` raises BudgetExceeded once the sum
    crosses the cap; after that `exceeded` stays set, so whatever the crossing interrupted (a closed
    connection, a killed command) is reported as the budget stop it is, never as a lost machine."""

    def __init__(self, max_cost_usd: Optional[float], clock: Callable[[], float] = time.time):
        self.max_cost_usd, self.clock = max_cost_usd, clock
        self.machines: list[CostMeter] = []
        self.failed_starts: list[CostMeter] = []
        self.exceeded: Optional[str] = None  # the message, once crossed
        self._lock = threading.Lock()

    def add_machine(self, lease: Lease) -> CostMeter:
        meter = CostMeter.from_lease(lease, clock=self.clock)
        with self._lock:
            self.machines.append(meter)
        self.add_failed_starts(lease.failed_starts)
        return meter

    def add_failed_starts(self, starts: Iterable[FailedStart]) -> None:
        """Instances a launch created and gave up on (destroyed_at None: not confirmed, still
        billing). Each instance is counted once; a later report of it brings its destroy time."""
        with self._lock:
            known = {m.instance_id for m in self.failed_starts if m.instance_id is not None}
            for r in starts or ():
                if r.instance_id is not None and r.instance_id in known:
                    for m in self.failed_starts:
                        if m.instance_id == r.instance_id and r.destroyed_at is not None:
                            m.destroyed_at = float(r.destroyed_at)
                    continue
                if r.instance_id is not None:
                    known.add(r.instance_id)
                self.failed_starts.append(CostMeter(
                    dph=float(r.dph_total or 0.0), created_at=float(self.clock() if r.created_at is None else r.created_at),
                    label=r.label, clock=self.clock, instance_id=r.instance_id,
                    destroyed_at=None if r.destroyed_at is None else float(r.destroyed_at)))

    def meter_for(self, lease: Lease) -> Optional[CostMeter]:
        with self._lock:
            for m in reversed(self.machines):
                if m.label == lease.label and m.instance_id == lease.instance_id:
                    return m
        return None

    def add_bytes_home(self, lease: Lease, nbytes: int) -> None:
        meter = self.meter_for(lease)
        if meter is not None:
            with self._lock:
                meter.add_bytes_home(nbytes)

    def add_bytes_down(self, lease: Lease, nbytes: int) -> None:
        meter = self.meter_for(lease)
        if meter is not None:
            with self._lock:
                meter.add_bytes_down(nbytes)

    def total_usd(self) -> float:
        with self._lock:
            meters = self.machines + self.failed_starts
        return sum(m.total_usd() for m in meters)

    def over_budget(self) -> bool:
        return self.max_cost_usd is not None and self.total_usd() > self.max_cost_usd

    def check(self) -> None:
        if self.exceeded is None and self.over_budget():
            with self._lock:
                n, failed = len(self.machines), len(self.failed_starts)
                bw = sum(m.bandwidth_usd() for m in self.machines)
            self.exceeded = (f"budget cap crossed: ${self.total_usd():.4f} spent by this run ({n} machine(s), "
                             f"{failed} failed start attempt(s), ${bw:.4f} bandwidth), machine.max_cost_usd is "
                             f"${self.max_cost_usd:.4f}; the machine is torn down")
        if self.exceeded is not None:
            raise BudgetExceeded(self.exceeded)


class BudgetTimer:
    """Checks a RunBudget every `every_s` seconds on its own thread, for the stretches no output
    line comes (pip, a silent step). On crossing it calls `on_exceeded()`, and again on every later
    tick while it runs (a retried command that reconnected is stopped again)."""

    def __init__(self, budget: RunBudget, every_s: float, on_exceeded: Callable[[], None], log=None):
        self.budget, self.every, self.on_exceeded, self.log = budget, every_s, on_exceeded, log
        self.stopping = threading.Event()
        self.fired = 0
        self.thread = threading.Thread(target=self._loop, name="budget-timer", daemon=True)

    def __enter__(self) -> "BudgetTimer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)

    def _loop(self) -> None:
        while not self.stopping.wait(self.every):
            try:
                self.budget.check()
            except BudgetExceeded as e:
                if self.fired == 0 and self.log is not None:
                    self.log(f"{e} (timer check)")
                self.fired += 1
                try:
                    self.on_exceeded()
                except Exception as x:  # never let the timer die: the next tick tries again
                    if self.log is not None:
                        self.log(f"budget timer: stopping the command failed: {x}")
