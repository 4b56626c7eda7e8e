"""CostMeter: per-step and total dollars from $/h and the machine's life; the budget cap."""
import pytest

from infra.cost import BudgetExceeded, CostMeter
from infra.machine import Lease


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_steps_total_and_rows():
    clock = Clock()
    lease = Lease(backend="vast", label="qat-x", dph_total=0.36, created_at=1000.0)
    meter = CostMeter.from_lease(lease, max_cost_usd=10, clock=clock)
    clock.t += 600  # boot
    with meter.step("train"):
        clock.t += 3600
    with pytest.raises(RuntimeError):
        with meter.step("convert"):
            clock.t += 1800
            raise RuntimeError("boom")
    clock.t += 60
    meter.destroyed()
    clock.t += 9999  # after the confirmed destroy nothing more is billed
    assert meter.steps[0] == {"step": "train", "started_at": 1600.0, "seconds": 3600.0, "usd": 0.36, "ok": True}
    assert meter.steps[1]["ok"] is False and meter.steps[1]["usd"] == pytest.approx(0.18)
    assert meter.elapsed_s() == 6060
    assert meter.total_usd() == pytest.approx(0.36 * 6060 / 3600)
    rows = meter.as_rows()
    assert [r["step"] for r in rows] == ["train", "convert", "outside steps (boot, idle, teardown)", "total"]
    assert rows[2]["seconds"] == 660
    assert sum(r["usd"] for r in rows[:3]) == pytest.approx(rows[3]["usd"], abs=1e-5)
    assert rows[3]["ok"] is True


def test_budget_cap():
    clock = Clock()
    meter = CostMeter(dph=2.0, created_at=clock(), max_cost_usd=1.0, label="qat-y", clock=clock)
    clock.t += 1799
    assert not meter.over_budget()
    meter.check_budget()
    clock.t += 2
    assert meter.over_budget()
    with pytest.raises(BudgetExceeded, match=r"\$1.0006 spent on qat-y.*max_cost_usd is \$1.0000"):
        meter.check_budget()


def test_no_cap():
    meter = CostMeter(dph=100.0, created_at=0.0, clock=lambda: 1e6)
    assert not meter.over_budget()
