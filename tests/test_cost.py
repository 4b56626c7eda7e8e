"""CostMeter: per-step and total dollars from $/h and the machine's life; the budget cap."""
import pytest

from tasks.budget import BudgetExceeded, CostMeter
from infra.machines.machine import FailedStart, Lease


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_steps_total_and_rows():
    clock = Clock()
    lease = Lease(backend="vast", label="qat-x", dph_total=0.36, created_at=1000.0)
    meter = CostMeter.from_lease(lease, clock=clock)
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
    from tasks.budget import RunBudget

    clock = Clock()
    budget = RunBudget(max_cost_usd=1.0, clock=clock)
    budget.add_machine(Lease(backend="vast", label="qat-y", dph_total=2.0, created_at=clock()))
    clock.t += 1799
    assert not budget.over_budget()
    budget.check()
    clock.t += 2
    assert budget.over_budget()
    with pytest.raises(BudgetExceeded, match=r"\$1.0006 spent by this run \(1 machine.*max_cost_usd is \$1.0000"):
        budget.check()


def test_no_cap():
    from tasks.budget import RunBudget

    budget = RunBudget(max_cost_usd=None, clock=lambda: 1e6)
    budget.add_machine(Lease(backend="vast", label="qat-z", dph_total=100.0, created_at=0.0))
    assert not budget.over_budget()


# ---------------------------------------------------------------- the run's budget (every machine)

def test_run_budget_counts_every_machine_failed_starts_and_bandwidth():
    from tasks.budget import RunBudget
    from tasks.billing import budget_rows, total_usd

    clock = Clock()
    budget = RunBudget(max_cost_usd=1.0, clock=clock)
    first = budget.add_machine(Lease(backend="vast", label="qat-r", instance_id=1, dph_total=0.36, created_at=1000.0,
                                     inet_up_cost=0.01, failed_starts=[FailedStart(7, 0.72, 0.0, 500.0),
                                                                       FailedStart(8, 0.36, 500.0, None)]))
    clock.t += 3600
    first.add_bytes_home(2_000_000_000)  # 2 GB at $0.01/GB
    first.destroyed()
    second = budget.add_machine(Lease(backend="vast", label="qat-r", instance_id=2, dph_total=0.36, created_at=clock.t))
    # the same failed start reported again (by the lease, then by a later report) is counted once
    budget.add_failed_starts([FailedStart(7, 0.72, 0.0, 500.0)])
    clock.t += 1800
    assert first.total_usd() == pytest.approx(0.36 + 0.02)
    assert second.total_usd() == pytest.approx(0.18)
    failed_7 = 0.72 * 500 / 3600
    failed_8 = 0.36 * (clock.t - 500) / 3600  # destroy not confirmed: it bills until now
    assert budget.total_usd() == pytest.approx(0.38 + 0.18 + failed_7 + failed_8)
    assert len(budget.failed_starts) == 2
    budget.add_bytes_home(Lease(backend="vast", label="qat-r", instance_id=2), 1_000_000)  # no $/GB known: free
    assert second.bytes_home == 1_000_000 and second.bandwidth_usd() == 0

    rows = budget_rows(budget)
    steps = [r["step"] for r in rows]
    assert "machine 1: bandwidth: 2000.0 MB copied home at $0.01/GB" in steps
    assert "machine 2: total" in steps and "machine 1: total" in steps
    assert sum(1 for s in steps if s.startswith("failed start attempt")) == 2
    assert any("destroy NOT confirmed" in s for s in steps)
    assert total_usd(rows) == pytest.approx(budget.total_usd(), abs=1e-4)
    # the totals are the rows marked so, not those whose name happens to end in "total"
    named = rows + [{"step": "a step named subtotal", "seconds": 9.0, "usd": 9.0, "usd_per_hour": 1.0,
                     "instance": 3, "total": False}]
    assert total_usd(named) == pytest.approx(budget.total_usd(), abs=1e-4)


def test_the_reports_total_is_the_bill():
    from contract.config import load_config
    from tasks.budget import RunBudget
    from tasks.billing import budget_rows, estimate_rows, total_usd
    from tasks.report import render_report

    clock = Clock()
    budget = RunBudget(max_cost_usd=5.0, clock=clock)
    for iid in (1, 2):
        budget.add_machine(Lease(backend="vast", label="qat-r", instance_id=iid, dph_total=0.36, created_at=clock.t))
        clock.t += 1800
    rows = budget_rows(budget)
    rows += estimate_rows({"estimated_usd": 0.5, "planned_hours": 1, "dph": 0.36}, rows)
    report = render_report(load_config("tiny"), None, {}, rows, {}, {}, {})
    total = next(line for line in report.splitlines() if line.startswith("| **total"))
    assert f"**{total_usd(rows):.4f}**" in total and total_usd(rows) == pytest.approx(budget.total_usd())


def test_run_budget_cap_over_all_machines_and_stays_crossed():
    from tasks.budget import RunBudget

    clock = Clock()
    budget = RunBudget(max_cost_usd=1.0, clock=clock)
    budget.add_failed_starts([FailedStart(5, 2.0, clock.t, clock.t + 1200)])
    budget.add_machine(Lease(backend="vast", label="qat-c", instance_id=6, dph_total=2.0, created_at=clock.t))
    clock.t += 599  # one machine alone is under the cap ($0.33); with the failed start's $0.67 it is not yet over
    budget.check()
    clock.t += 2
    with pytest.raises(BudgetExceeded, match=r"1 machine\(s\), 1 failed start attempt\(s\).*max_cost_usd is \$1.0000"):
        budget.check()
    assert budget.exceeded
    clock.t = 0  # whatever the clock says later, a crossed budget stays crossed
    with pytest.raises(BudgetExceeded):
        budget.check()


def test_budget_timer_stops_a_silent_command():
    """No output line comes: the timer alone finds the crossing and stops the command (again on each tick)."""
    import threading

    from tasks.budget import BudgetTimer, RunBudget

    clock = Clock()
    budget = RunBudget(max_cost_usd=0.01, clock=clock)
    budget.add_machine(Lease(backend="vast", label="qat-t", instance_id=1, dph_total=3.6, created_at=clock.t))
    stopped = threading.Event()
    messages: list[str] = []
    with BudgetTimer(budget, every_s=0.02, on_exceeded=stopped.set, log=messages.append) as timer:
        assert not stopped.wait(0.2)  # under the cap: nothing happens
        clock.t += 11  # $0.011 > $0.01
        assert stopped.wait(5)
        deadline = __import__("time").monotonic() + 5
        while timer.fired < 2 and __import__("time").monotonic() < deadline:
            __import__("time").sleep(0.02)
    assert timer.fired >= 2 and not timer.thread.is_alive()
    assert len(messages) == 1 and "timer check" in messages[0]


def test_check_budget_uses_the_run_budget_of_the_lease(monkeypatch):
    from contract.config import load_config
    from tasks.budget import RunBudget
    from tasks import billing

    cfg = load_config("tiny", {"machine.max_cost_usd": 0.5})
    lease = Lease(backend="vast", label="qat-reg", instance_id=3, dph_total=0.36, created_at=__import__("time").time())
    billing.check_budget(lease, cfg)  # no run budget: this machine alone, just rented
    budget = RunBudget(0.5)
    billing.register(budget, lease)
    try:
        budget.add_failed_starts([FailedStart(99, 100.0, 0.0, 3600.0)])
        with pytest.raises(BudgetExceeded):
            billing.check_budget(lease, cfg)
        billing.record_bytes_home(lease, 1234)
        assert budget.meter_for(lease).bytes_home == 1234
    finally:
        billing.forget(budget)
    assert billing.budget_for(lease) is None


def test_report_lists_failed_starts_and_bandwidth():
    from contract.config import load_config
    from tasks.report import render_report

    costs = [{"step": "train", "seconds": 10.0, "usd": 0.01, "total": False},
             {"step": "bandwidth: 5.0 MB copied home at $0.004/GB", "seconds": 0.0, "usd": 0.00002, "total": False},
             {"step": "total", "seconds": 12.0, "usd": 0.012, "total": True},
             {"step": "failed start attempt, instance 4 (destroyed): total", "seconds": 30.0, "usd": 0.003, "total": True}]
    md = render_report(load_config("tiny"), None, {}, costs, {}, {"passed": False, "reason": "x"},
                       {"uploaded": False, "path": "/x", "reason": "no"})
    assert "| failed start attempt, instance 4 (destroyed): total | 30.0 | 0.0030 |" in md
    assert "bandwidth: 5.0 MB" in md and "**0.0150**" in md


# ---------------------------------------------------------------- failed starts reported by launch (emulator)

def test_launch_reports_failed_starts_and_the_budget_matches_the_bill(emulator):
    from contract.config import load_config
    from tasks.budget import RunBudget
    from infra.backends.vast.api import ProvisionError
    from infra.backends.vast.instances import VastProvider

    emulator.set_faults(stuck_loading=True)

    def log(msg: str) -> None:
        if "attempt 2/" in msg:
            emulator.clear_faults()

    p = VastProvider(api_key=emulator.api_key, server_url=emulator.url, poll_s=0.2, backoff_s=0.02, log_fn=log)
    mc = load_config("tiny", {"machine.provision_timeout_s": 2}).machine
    lease = p.launch(mc, "qat-budget", "ssh-ed25519 AAAA test")
    seen = lease.failed_starts
    assert len(seen) == 1 and seen[0].destroyed_at is not None and seen[0].instance_id != lease.instance_id
    assert lease.inet_up_cost > 0
    budget = RunBudget(max_cost_usd=10)
    meter = budget.add_machine(lease)
    budget.add_failed_starts(seen)  # reported twice (the lease, then again): counted once
    p.destroy(lease.instance_id)
    meter.destroyed()
    rows = emulator.ledger()["instances"]
    billed = sum(r["cost"] for r in rows)
    # Our times bracket the provider's (creation asked before create, destroy stamped once confirmed):
    # never under the bill, over it by at most the API round trips (~1 s per instance here).
    assert billed * 0.99 <= budget.total_usd() <= billed + sum(r["dph_total"] for r in rows) * 1.5 / 3600

    emulator.set_faults(stuck_loading=True)
    p = VastProvider(api_key=emulator.api_key, server_url=emulator.url, poll_s=0.2, backoff_s=0.02)
    with pytest.raises(ProvisionError) as err:
        p.launch(load_config("tiny", {"machine.provision_timeout_s": 1, "machine.vast.create_attempts": 2}).machine,
                 "qat-never", "ssh-ed25519 AAAA test")
    assert len(err.value.failed_starts) == 2
    assert all(r.destroyed_at is not None for r in err.value.failed_starts)


def test_cost_table_shows_the_estimate_beside_the_actual_cost():
    from tasks.billing import estimate_rows, total_usd

    costs = [{"step": "train", "seconds": 7000.0, "usd": 4.9, "usd_per_hour": 2.52, "instance": 7, "total": False},
             {"step": "total", "seconds": 9000.0, "usd": 6.3, "usd_per_hour": 2.52, "instance": 7, "total": True}]
    est = {"basis": "samples x $/sample + setup", "estimated_usd": 5.5, "planned_hours": 2.0, "dph": 2.52,
           "gpu_name": "H200", "expected_samples_per_s": 52.2, "speed_source": "measured"}
    rows = estimate_rows(est, costs, {"samples_per_s": 50.0, "first_step_s": 42.0})
    assert rows[0]["usd"] == 5.5 and rows[0]["seconds"] == 7200.0 and "H200" in rows[0]["step"]
    assert rows[1]["step"] == "actual minus estimate" and rows[1]["usd"] == pytest.approx(0.8)
    assert rows[1]["seconds"] == pytest.approx(1800.0)
    assert "expected 52.2" in rows[2]["step"] and "measured 50" in rows[2]["step"]
    assert total_usd(costs + rows) == total_usd(costs) == 6.3  # the bill is not changed by the comparison
    assert estimate_rows({}, costs) == []
