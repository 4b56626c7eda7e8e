"""README's "What survives what" table is what `python -m benchmarks.chaos --render-readme` makes from the
committed benchmarks/chaos.json: a hand edit or a stale file fails here. Fast: no stack is started."""
from __future__ import annotations

import json

from benchmarks import chaos
from devtools.emulator.knobs import GLOBAL_KNOBS, INSTANCE_KNOBS


def committed() -> dict:
    return json.loads(chaos.OUT_JSON.read_text())


def test_readme_table_is_rendered_from_the_committed_chaos_json():
    readme = chaos.README.read_text()
    assert chaos.render_readme(readme, committed()) == readme, (
        "README.md's chaos table differs from benchmarks/chaos.json: run `python -m benchmarks.chaos --render-readme`")


def test_a_hand_edited_figure_is_caught():
    readme = chaos.README.read_text()
    row = next(line for line in readme.splitlines() if "billed up to $" in line)
    edited = readme.replace(row, row.replace("billed up to $", "billed up to $9"))
    assert chaos.render_readme(edited, committed()) != edited


def test_scenarios_without_a_run_are_marked_not_measured_yet():
    data = committed()
    data["scenarios"] = [r for r in data["scenarios"] if r["scenario"] != "cancel"]
    section = chaos.render_readme_section(data)
    cancel = next(s for s in chaos.SCENARIOS if s.name == "cancel")
    assert f"| {cancel.fault} | {cancel.does} | not measured yet |" in section
    assert "not measured yet: " in section and "cancel" in section.split("not measured yet: ")[1].split("\n")[0]


def test_every_scenario_says_what_the_flow_does_and_uses_known_knobs():
    names = [s.name for s in chaos.SCENARIOS]
    assert len(names) == len(set(names))
    for s in chaos.SCENARIOS:
        assert s.does and s.fault, s.name
        assert set(s.faults) <= INSTANCE_KNOBS | GLOBAL_KNOBS, (s.name, s.faults)


def test_repeated_runs_are_all_kept_and_a_failure_is_what_the_entry_shows():
    good = {"scenario": "x", "run_id": "a", "final_state": "COMPLETED", "ended_correctly": True, "cost_usd": 0.01,
            "bound_usd": 1.0, "within_bound": True, "seconds": 5, "reason": "", "instances": [{}], "leaked": [],
            "lost_artifacts": []}
    bad = {**good, "run_id": "b", "final_state": "FAILED", "ended_correctly": False, "reason": "boom", "leaked": [7]}
    entry = chaos.scenario_entry([good, bad])
    assert entry["run_id"] == "b" and not entry["ended_correctly"]
    assert [r["run_id"] for r in chaos.runs_of(entry)] == ["a", "b"] and chaos.runs_of(entry)[1]["leaked"] == 1
    old = {k: v for k, v in good.items() if k not in ("bound_usd", "within_bound")}  # a row from before --repeat
    assert chaos.runs_of(old)[0]["run_id"] == "a" and "bound not recorded" in chaos._measured(old)


def test_the_billing_bound_is_the_cap_plus_one_check_interval_of_every_instance():
    rows = [{"dph_total": 0.36}, {"dph_total": 0.72}]
    assert chaos.billing_bound(rows, 0.01, 30) == round(0.01 + 1.08 * 30 / 3600, 6)
