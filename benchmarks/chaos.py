"""Chaos bench: real `qat` flow runs (tiny model, Vast.ai emulator, real sshd, real Prefect server
and Runner) under one fault each. For every scenario: did it end as it should, were instances
leaked (emulator ledger), were artifacts lost (expected files and Prefect artifacts), how many
dollars beyond the clean baseline run were billed.

    .venv/bin/python -m benchmarks.chaos [--only baseline,preempt,...] [--list] [--keep DIR]

Writes benchmarks/chaos.json (merged by scenario name, so a partial re-run keeps the other rows) and
benchmarks/CHAOS.md. Scenarios run one after another; a failing one is recorded with its reason.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import psutil

from devtools.services import REPO, wait_for
from devtools.stack import Stack

OUT_JSON = REPO / "benchmarks" / "chaos.json"
OUT_MD = REPO / "benchmarks" / "CHAOS.md"
STEP_NAMES = ("prepare", "train", "convert", "bench", "evaluate")
# Every full run uses these, so any run compares with the baseline (same train config, same data order).
COMMON = {"train.max_steps": 6, "train.save_every": 2, "train.eval_every": 6, "data.max_eval_samples": 2,
          "bench.max_clips": 1, "eval.bootstrap_samples": 20}
LONG_TRAIN = {"train.max_steps": 400}  # for runs interrupted mid-training
# Weights of the preempted-and-resumed model vs the baseline's: same seed, data order and restored
# RNG/optimizer state on the same CPU kernels. Any real resume bug (a skipped or repeated batch, a
# reset optimizer) moves weights by ~learning rate (1e-3); float noise stays below 1e-6.
WEIGHT_ATOL = 1e-5


@dataclass
class Scenario:
    name: str
    fault: str
    expect: tuple[str, ...]               # acceptable final state types
    overrides: dict = field(default_factory=dict)
    faults: dict = field(default_factory=dict)   # set on label prefix "qat-" before the run
    action: Optional[Callable] = None     # (stack, run_id, notes) -> None, runs while the flow does
    message: str = ""                     # the final state's message must contain this (failures)
    final: bool = True                    # False: the run is never finalised (its process was killed)


# ---------------------------------------------------------------- triggers

def _instance(stack: Stack, run_id: str, timeout: float = 600) -> dict:
    return wait_for(lambda: next(iter(stack.live(run_id)), None), timeout, 0.2, "an instance for the run")


def _remote_train_started(stack: Stack, run_id: str, timeout: float = 900) -> dict:
    """The instance once the train step is running on it (its checkpoints folder or history exists)."""
    def started():
        for inst in stack.live(run_id):
            disk = Path(stack.emu.instance_info(inst["id"])["disk"])
            if (disk / "qat/work/train/history.jsonl").exists() or list((disk / "qat/work/train").glob("checkpoints/step-*")):
                return inst
        if stack.state(run_id).is_final():
            raise RuntimeError("the run ended before training started")
        return None
    return wait_for(started, timeout, 0.5, "training to start on the machine")


def act_stuck_first(stack, run_id, notes):
    """The first instance stays `loading` forever; later ones boot normally."""
    inst = _instance(stack, run_id)
    stack.emu.set_faults(id=inst["id"], stuck_loading=True)  # an instance rule beats the label rule
    stack.emu.set_faults(label_prefix="qat-", stuck_loading=False)
    notes["stuck_instance"] = inst["id"]


def act_429_bursts(stack, run_id, notes):
    """Bursts of 4 x 429 on whatever the next 4 API calls are (any endpoint); once a burst is spent,
    15 s of normal service, then the next one, until the run ends."""
    notes["bursts"] = 0
    while not stack.state(run_id).is_final():
        stack.emu.set_faults(http_429=4)
        notes["bursts"] += 1
        while stack.emu.admin("GET", "/_emulator/faults").get("http_429") and not stack.state(run_id).is_final():
            time.sleep(0.5)
        time.sleep(15)


def act_drop_ssh(stack, run_id, notes):
    """Kill the instance's per-connection sshd processes mid-training: every session drops."""
    inst = _remote_train_started(stack, run_id)
    time.sleep(3)
    sshd = stack.emu.instance_info(inst["id"])["sshd_pid"]
    kids = psutil.Process(sshd).children()
    for k in kids:
        k.kill()
    notes["sessions_killed"] = len(kids)


def run_dir_of(stack, name: str, run_id: str) -> Path:
    """The flow run's folder at home: runs/<name>/<UTC time>-<flow run id>/ (tasks/run_dir.py)."""
    mine = sorted((stack.runs_dir / name).glob(f"*-{run_id}"))
    return mine[-1] if mine else stack.runs_dir / name / f"missing-run-dir-{run_id}"


def act_preempt(stack, run_id, notes):
    """Preempt the instance once a checkpoint has been copied home."""
    inst = _remote_train_started(stack, run_id)
    home = lambda: run_dir_of(stack, "chaos-preempt", run_id) / "work" / "train" / "checkpoints"  # noqa: E731
    ckpt = wait_for(lambda: sorted(p.name for p in home().glob("step-*")), 600, 0.5, "a checkpoint copied home")
    stack.emu.set_faults(id=inst["id"], preempt_after_s=0)
    notes.update(preempted_instance=inst["id"], checkpoint_home_at_preemption=ckpt[-1], preempted_at=time.time())


def act_cancel(stack, run_id, notes):
    _remote_train_started(stack, run_id)
    notes["cancelled_at"] = time.time()
    stack.cancel(run_id)


def act_kill_all(stack, run_id, notes, every_s: float = 10, timeout: float = 420):
    """SIGKILL the qat runner and its flow process (a lost worker), then let the deployed reaper,
    served by its own runner that survives the kill, do its job: it is triggered every `every_s`
    (its schedule, compressed) until the instance is destroyed. Records when the reaper first judged
    the run gone, how many of its runs it took, and whether the reaper is what destroyed it."""
    inst = _remote_train_started(stack, run_id)
    notes["killed_at"] = time.time()
    stack.kill_runner()
    assert stack.reaper is not None and stack.reaper.alive(), "the reaper's runner died with the qat runner"
    tag = f"instance {inst['id']} ("
    notes["reaper_runs"], notes["reaped"] = 0, []
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            reap_id = stack.trigger_reaper()
            notes["reaper_runs"] += 1
            end = stack.wait_final(reap_id, 180)
            # its logs reach the server in batches: the last line ("reaped N instance(s)") closes them
            logs = (wait_for(lambda: (got := stack.logs(reap_id)) and any("reaped " in x for x in got) and got,
                             20, 0.5, "the reaper's logs") if end.type.value == "COMPLETED" else stack.logs(reap_id))
            lines = [x for x in logs if tag in x]
            if end.type.value != "COMPLETED":
                notes.setdefault("reaper_failures", []).append(f"{end.type.value}: {end.message}"[:300])
            if "judged_dead_after_s" not in notes and any("gone" in x for x in lines):
                notes["judged_dead_after_s"] = round(time.time() - notes["killed_at"], 1)
                notes["judged_dead_by_reaper_run"] = notes["reaper_runs"]
            if any(f"destroyed instance {inst['id']} " in x for x in lines):
                notes["reaped"] = lines
                notes["destroyed_after_s"] = round(time.time() - notes["killed_at"], 1)
                notes["teardown_by"] = "reaper"
                notes["checks_gone_before_destroy"] = notes["reaper_runs"] - notes["judged_dead_by_reaper_run"] + 1
                break
            time.sleep(every_s)
        else:
            raise TimeoutError(f"the deployed reaper did not destroy instance {inst['id']} within {timeout:.0f}s")
    finally:
        stack.start_runner()


SCENARIOS = [
    Scenario("baseline", "none", ("COMPLETED",)),
    Scenario("preempt", "preemption mid-training (after a checkpoint came home)", ("COMPLETED",),
             overrides={"machine.checkpoint_sync_every_s": 2, "machine.ssh_timeout_s": 30}, action=act_preempt),
    Scenario("kill-worker", "SIGKILL of the runner and the flow process mid-training", ("RUNNING",),
             overrides=LONG_TRAIN, action=act_kill_all, final=False),
    Scenario("cancel", "cancel from the API mid-training", ("CANCELLED",), overrides=LONG_TRAIN, action=act_cancel),
    Scenario("budget", "budget cap crossed (machine.max_cost_usd $0.002)", ("FAILED",),
             overrides={"machine.max_cost_usd": 0.002, "machine.planned_hours": 0.001}, message="budget"),
    Scenario("disk-full", "rented disk full (30 MB tmpfs)", ("FAILED",), faults={"disk_full_mb": 30},
             message="disk"),
    Scenario("ssh-drop", "SSH sessions killed mid-training", ("COMPLETED",), action=act_drop_ssh),
    Scenario("destroy-fails", "first destroy answers 500", ("COMPLETED",), faults={"destroy_fail_once": True}),
    Scenario("destroy-silent", "first destroy claims success but keeps the instance", ("COMPLETED",),
             faults={"destroy_fail_once": "silent"}),
    Scenario("http-429", "bursts of 4 x HTTP 429 on any endpoint, the next 15 s after one is spent", ("COMPLETED",), action=act_429_bursts),
    Scenario("ssh-refused", "SSH refused for 25 s after `running`", ("COMPLETED",), faults={"ssh_refuse_s": 25}),
    Scenario("stuck-loading", "first instance stuck in `loading` (provision timeout 15 s)", ("COMPLETED",),
             overrides={"machine.provision_timeout_s": 15}, faults={"stuck_loading": True}, action=act_stuck_first),
]


# ---------------------------------------------------------------- measuring

def expected_files(stack: Stack, run_id: str, name: str, state_type: str, message: str = "") -> list[str]:
    """What must be home: result.json of every step that completed, error.json of a step that ran
    on the machine and failed there (StepFailed), and on success the converted model, the report
    and the Prefect artifacts."""
    tasks = dict(stack.task_states(run_id))
    need = [f"work/{s}/result.json" for s in STEP_NAMES if tasks.get(s) == "COMPLETED"]
    need += [f"work/{s}/error.json" for s in STEP_NAMES if tasks.get(s) == "FAILED" and f"step {s} failed" in message]
    if state_type == "COMPLETED":
        need += ["work/convert/qat_int8/", "run.yaml"]
    run_dir = run_dir_of(stack, name, run_id)
    missing = [p for p in need if not ((run_dir / p).is_dir() and any((run_dir / p).iterdir())
                                       if p.endswith("/") else (run_dir / p).is_file())]
    if state_type == "COMPLETED":
        keys = {a.key for a in stack.artifacts(run_id) if a.key}
        missing += [f"artifact {k}" for k in (f"qat-{name}-{x}" for x in ("report", "metrics", "cost", "model", "chart"))
                    if k not in keys]
    return missing


def teardown_layer(stack: Stack, run_id: str, instances: list[dict], notes: dict) -> str:
    if notes.get("teardown_by"):
        return notes["teardown_by"]
    tasks = [s for n, s in stack.task_states(run_id) if n.startswith("destroy machine")]
    text = stack.runner_text()
    hook = [i["id"] for i in instances if f"destroyed [{i['id']}" in text or f", {i['id']}]" in text]
    if tasks and tasks[-1] == "COMPLETED":
        return "flow finally (destroy machine task)" + (" + hook" if hook else "")
    if hook:
        return "on_crashed/on_cancellation hook"
    return "unknown (no destroy task completed, no hook line)"


def abandoned_usd(instances: list[dict], state_type: str) -> float:
    """Dollars billed by machines that did not carry the run to its end (all of them if it did not end well)."""
    keep = instances[-1]["id"] if state_type == "COMPLETED" and instances else None
    return round(sum(i["cost"] for i in instances if i["id"] != keep), 6)


def compare_weights(a: Path, b: Path) -> dict:
    from safetensors.numpy import load_file

    fa, fb = sorted(a.glob("*.safetensors")), sorted(b.glob("*.safetensors"))
    if not fa or [p.name for p in fa] != [p.name for p in fb]:
        return {"compared": False, "reason": f"weights missing: {[p.name for p in fa]} vs {[p.name for p in fb]}"}
    worst, n = 0.0, 0
    for x, y in zip(fa, fb):
        ta, tb = load_file(str(x)), load_file(str(y))
        if set(ta) != set(tb):
            return {"compared": False, "reason": "different tensor names"}
        for k in ta:
            worst = max(worst, float(abs(ta[k].astype("float64") - tb[k].astype("float64")).max()) if ta[k].size else 0.0)
            n += 1
    return {"compared": True, "tensors": n, "max_abs_diff": worst, "atol": WEIGHT_ATOL, "equal": worst <= WEIGHT_ATOL}


def run_scenario(stack: Stack, sc: Scenario, baseline: Optional[dict]) -> dict:
    stack.emu.clear_faults()
    if sc.faults:
        stack.emu.set_faults(label_prefix="qat-", **sc.faults)
    name = f"chaos-{sc.name}"
    shutil.rmtree(stack.runs_dir / name, ignore_errors=True)
    t0 = time.time()
    run_id = stack.submit(overrides={**COMMON, "name": name, **sc.overrides})
    notes: dict = {}
    errors: list[str] = []
    if sc.action:
        def act():
            try:
                sc.action(stack, run_id, notes)
            except Exception as e:  # the scenario failed to inject its fault: reported, not hidden
                errors.append(f"fault injection failed: {type(e).__name__}: {e}")
        th = threading.Thread(target=act, daemon=True)
        th.start()
    state = None
    if sc.final:
        try:
            state = stack.wait_final(run_id, 1800)
        except TimeoutError as e:
            errors.append(str(e))
    if sc.action:
        th.join(timeout=900)
    state = state or stack.state(run_id)
    # Hooks and a retried destroy may finish a moment after the state: give them 60 s.
    try:
        wait_for(lambda: not stack.live(run_id), 60, 1, "teardown")
    except TimeoutError:
        pass
    stack.emu.clear_faults()
    instances = stack.instances(run_id)
    leaked = [i["id"] for i in instances if i["ended_at"] is None]
    cost = round(sum(i["cost"] for i in instances), 6)
    missing = expected_files(stack, run_id, name, state.type.value, state.message or "")
    row = {"scenario": sc.name, "fault": sc.fault, "run_id": run_id, "expected": list(sc.expect),
           "final_state": state.type.value, "message": (state.message or "")[:400], "seconds": round(time.time() - t0, 1),
           "instances": [{k: i[k] for k in ("id", "end_reason", "seconds", "cost")} for i in instances],
           "leaked": leaked, "lost_artifacts": missing, "cost_usd": cost,
           "wasted_usd": round(max(0.0, cost - baseline["cost_usd"]), 6) if baseline else None,
           "abandoned_usd": abandoned_usd(instances, state.type.value),
           "teardown_by": teardown_layer(stack, run_id, instances, notes), "notes": notes, "errors": errors}
    ok_state = state.type.value in sc.expect and (sc.message.lower() in (state.message or "").lower())
    if sc.name == "preempt" and baseline:
        row["weights_vs_baseline"] = compare_weights(run_dir_of(stack, name, run_id) / "work/train/model",
                                                     Path(baseline["model_dir"]))
        ok_state = ok_state and row["weights_vs_baseline"].get("equal", False)
        ok_state = ok_state and len(instances) >= 2
    if sc.name == "baseline":
        keep = Path(tempfile.mkdtemp(prefix="chaos-baseline-model-"))
        shutil.copytree(run_dir_of(stack, name, run_id) / "work/train/model", keep, dirs_exist_ok=True)
        row["model_dir"] = str(keep)
    row["ended_correctly"] = bool(ok_state and not leaked and not errors)
    why = []
    if state.type.value not in sc.expect:
        why.append(f"ended {state.type.value}, expected {'/'.join(sc.expect)}")
    elif sc.message and sc.message.lower() not in (state.message or "").lower():
        why.append(f"message lacks {sc.message!r}")
    why += [f"leaked instances {leaked}"] if leaked else []
    why += errors
    if "weights_vs_baseline" in row and not row["weights_vs_baseline"].get("equal"):
        why.append(f"resumed weights differ from the baseline: {row['weights_vs_baseline']}")
    row["reason"] = "; ".join(why)
    return row


# ---------------------------------------------------------------- report

def render(rows: list[dict], findings: list[str] = ()) -> str:
    ok = sum(r["ended_correctly"] for r in rows)
    lines = ["# Chaos bench", "",
             "Generated by `make chaos` (`.venv/bin/python -m benchmarks.chaos`): each row is one real `qat` flow run",
             "(tiny model, Vast.ai emulator with real sshd instances, Prefect server + Runner) under one fault.",
             f"Common overrides: `{json.dumps(COMMON)}`; interrupted runs use `train.max_steps: 400`.", "",
             f"**{ok}/{len(rows)} scenarios ended correctly; leaked instances: {sum(len(r['leaked']) for r in rows)}; "
             f"lost artifacts: {sum(len(r['lost_artifacts']) for r in rows)}.**", "",
             "| scenario | fault | ended | correct | leaked | lost artifacts | cost $ | beyond baseline $ | "
             "abandoned machines $ | teardown by | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        wasted = "" if r["wasted_usd"] is None else f"{r['wasted_usd']:.4f}"
        lines.append(f"| {r['scenario']} | {r['fault']} | {r['final_state']} | {'yes' if r['ended_correctly'] else 'NO'} | "
                     f"{len(r['leaked'])} | {len(r['lost_artifacts'])} | {r['cost_usd']:.4f} | {wasted} | "
                     f"{r.get('abandoned_usd', 0.0):.4f} | "
                     f"{r['teardown_by']} | {r['seconds']:.0f} |")
    lines += ["", "Cost = the emulator ledger's bill for the run's instances. Beyond baseline = that minus the clean "
              "baseline run's bill (0 when cheaper; on a shared machine run times, hence bills, vary by about +-40 %). "
              "Abandoned machines = the bill of instances that did not carry the run to a successful end "
              "(stuck, preempted, killed, or all of them when the run failed by design).", "", "## Details", ""]
    for r in rows:
        lines.append(f"- **{r['scenario']}**: {r['final_state']}" + (f" - {r['reason']}" if r["reason"] else "")
                     + (f"; state message: {r['message'][:200]!r}" if r["message"] else ""))
        lines.append(f"  instances: {[(i['id'], i['end_reason'], round(i['seconds'])) for i in r['instances']]}"
                     + (f"; notes: {json.dumps({k: v for k, v in r['notes'].items() if k != 'reaped'})}" if r["notes"] else ""))
        if r["lost_artifacts"]:
            lines.append(f"  missing: {r['lost_artifacts']}")
        if "weights_vs_baseline" in r:
            lines.append(f"  weights vs baseline: {json.dumps(r['weights_vs_baseline'])}")
    if findings:
        lines += ["", "## Findings while measuring (earlier runs of the same scenarios)", ""]
        lines += [f"- {f}" for f in findings]
    return "\n".join(lines) + "\n"


def save(rows_by_name: dict) -> None:
    order = [s.name for s in SCENARIOS]
    rows = sorted(rows_by_name.values(), key=lambda r: order.index(r["scenario"]) if r["scenario"] in order else 99)
    findings = json.loads(OUT_JSON.read_text()).get("findings", []) if OUT_JSON.is_file() else []
    OUT_JSON.write_text(json.dumps({"generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                    "common_overrides": COMMON, "scenarios": rows, "findings": findings},
                                   indent=1) + "\n")
    OUT_MD.write_text(render(rows, findings))


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help="comma-separated scenario names (the baseline always runs first when needed)")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    p.add_argument("--keep", help="keep the stack's files (logs, runs, emulator state) in this directory")
    p.add_argument("--out", help="write OUT.json / OUT.md instead of benchmarks/chaos.json / benchmarks/CHAOS.md "
                                 "(the baseline is still read from benchmarks/chaos.json)")
    args = p.parse_args(argv)
    global OUT_JSON, OUT_MD
    main_json = OUT_JSON
    if args.out:
        OUT_JSON, OUT_MD = Path(args.out + ".json"), Path(args.out + ".md")
    if args.list:
        for s in SCENARIOS:
            print(f"{s.name:15} {s.fault}")
        return 0
    names = [s.name for s in SCENARIOS] if not args.only else args.only.split(",")
    unknown = set(names) - {s.name for s in SCENARIOS}
    if unknown:
        p.error(f"unknown scenario(s) {sorted(unknown)}; --list shows them")
    previous = json.loads(OUT_JSON.read_text()) if OUT_JSON.is_file() else {"scenarios": []}
    rows = {r["scenario"]: r for r in previous.get("scenarios", [])}
    if "baseline" not in rows and main_json.is_file():
        rows["baseline"] = next((r for r in json.loads(main_json.read_text())["scenarios"] if r["scenario"] == "baseline"), {})
    baseline = rows.get("baseline") if "baseline" not in names and Path(rows.get("baseline", {}).get("model_dir", "/nonexistent")).is_dir() else None
    if baseline is None and "baseline" not in names:
        names.insert(0, "baseline")
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="qat-chaos-"))
    print(f"chaos: stack in {root}", flush=True)
    with Stack(root) as stack:
        for sc in (s for s in SCENARIOS if s.name in names):
            print(f"chaos: {sc.name}: {sc.fault} ...", flush=True)
            try:
                row = run_scenario(stack, sc, baseline)
            except Exception as e:  # the harness itself broke: say so in the table
                row = {"scenario": sc.name, "fault": sc.fault, "final_state": "HARNESS_ERROR", "ended_correctly": False,
                       "reason": f"{type(e).__name__}: {e}", "leaked": [i["id"] for i in stack.emu.live_instances()],
                       "lost_artifacts": [], "cost_usd": 0.0, "wasted_usd": None, "teardown_by": "", "seconds": 0,
                       "instances": [], "notes": {}, "message": ""}
                from infra.vast import VastProvider

                for i in stack.emu.live_instances():  # never leave one billing for the next scenario
                    VastProvider(api_key=stack.api_key, server_url=stack.emu.url).destroy(int(i["id"]))
            if sc.name == "baseline":
                baseline = row
            rows[sc.name] = row
            save(rows)
            print(f"chaos: {sc.name}: {'ok' if row['ended_correctly'] else 'FAILED: ' + row['reason']} "
                  f"({row['final_state']}, {row['seconds']}s, leaked {len(row['leaked'])}, "
                  f"lost {len(row['lost_artifacts'])}, ${row['cost_usd']})", flush=True)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    bad = [r["scenario"] for r in rows.values() if not r["ended_correctly"]]
    print(f"chaos: wrote {OUT_JSON} and {OUT_MD}; "
          f"{'all ended correctly' if not bad else 'not correct: ' + ', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
