"""Chaos bench: real `qat` flow runs (tiny model, Vast.ai emulator, real sshd, real Prefect server
and Runner) under one fault each. For every scenario: did it end as it should, were instances
leaked (emulator ledger), were artifacts lost (expected files and Prefect artifacts), how many
dollars were billed, and whether the bill stayed within the budget bound (machine.max_cost_usd plus
one budget check interval of every instance's $/h).

    .venv/bin/python -m benchmarks.chaos [--only baseline,preempt,...] [--repeat N] [--list] [--keep DIR] [--out PREFIX]
    .venv/bin/python -m benchmarks.chaos --render-readme    # README's "What survives what" from chaos.json

Each scenario runs --repeat times (default 2); benchmarks/chaos.json keeps every run (merged by
scenario name, so a partial re-run keeps the other rows) and benchmarks/CHAOS.md shows runs/ok per
scenario. Scenarios run one after another; a failing one is recorded with its reason.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import psutil

from contract.catalogue import STEPS
from devtools.deployments import deployment, deployment_env
from devtools.emulator.cloud import GLOBAL_COUNTERS, GLOBAL_KNOBS
from devtools.emulator.sshd import instance_processes
from devtools.services import PY, REPO, wait_for
from devtools.stack import LocalStack
from devtools.throwaway_stack import Stack

OUT_JSON = REPO / "benchmarks" / "chaos.json"
OUT_MD = REPO / "benchmarks" / "CHAOS.md"
README = REPO / "README.md"
README_START = "<!-- chaos-table:start (python -m benchmarks.chaos --render-readme; do not edit by hand) -->"
README_END = "<!-- chaos-table:end -->"
# Every full run uses these, so any run compares with the baseline (same train config, same data order).
COMMON = {"train.max_steps": 6, "train.save_every": 2, "train.eval_every": 6, "data.max_eval_samples": 2,
          "bench.max_clips": 1, "eval.bootstrap_samples": 20}
LONG_TRAIN = {"train.max_steps": 400}  # for runs interrupted mid-training
# A 2-GPU offer of the emulator (machine.gpu none: 2 CPU ranks, gloo). The global batch stays 2 samples (1 x 2
# micro-batches, one per rank); a replacement with 1 GPU accumulates both micro-batches itself.
TWO_GPUS = {"machine.vast.gpu_names": ["RTX 4090"], "machine.vast.num_gpus": 2, "train.per_device_batch_size": 1,
            "train.grad_accum": 2, "machine.checkpoint_sync_every_s": 2, "machine.ssh_timeout_s": 30}
# Weights of the preempted-and-resumed model vs the baseline's: same seed, data order and restored
# RNG/optimizer state on the same CPU kernels. Any real resume bug (a skipped or repeated batch, a
# reset optimizer) moves weights by ~learning rate (1e-3); float noise stays below 1e-6.
WEIGHT_ATOL = 1e-5
# A run resumed on another number of ranks sums the same samples in another order: float rounding that
# AdamW's normalized update turns into a few % of a step (tests/test_ddp.py); its weights are compared by
# how far apart the two runs ended relative to how far training moved them from the start.
RESHARDED_TOLERANCE = 0.05


@dataclass
class Scenario:
    name: str
    fault: str                            # what happens (the README's first column)
    expect: tuple[str, ...]               # acceptable final state types
    does: str = ""                        # what the flow does about it (the README's second column)
    overrides: dict = field(default_factory=dict)
    faults: dict = field(default_factory=dict)   # set before the run: global knobs globally, the others on label prefix "qat-"
    action: Optional[Callable] = None     # (stack, run_id, notes) -> None, runs while the flow does
    message: str = ""                     # the final state's message must contain this (failures)
    final: bool = True                    # False: the run is never finalised (its process was killed)
    resumes: bool = False                 # a machine is lost mid-training: >= 2 instances, weights == the reference's
    reference: str = "baseline"           # the scenario whose uninterrupted model a resumed run must equal
    gpus: tuple[int, ...] = ()            # the GPU counts of the machines rented, in order (empty: not checked)
    resharded: bool = False               # resumed on another number of ranks: weights within RESHARDED_TOLERANCE
    max_instances: Optional[int] = None   # at most this many instances may be rented (0: refused before renting)
    prepare: Optional[Callable] = None    # (stack) -> overrides computed when the scenario starts
    start: Optional[Callable] = None      # (stack, sc, notes, errors) -> run id: replaces submit + action + wait
    config: str = "tiny"


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


def _preempt(stack, run_id, notes, mode: str, **knobs) -> None:
    """Preempt the instance (emulator preempt_mode `mode`) once a checkpoint has been copied home."""
    inst = _remote_train_started(stack, run_id)
    ckpt = wait_for(lambda: sorted(p.name for p in stack.runs_dir.glob(f"*/*-{run_id}/work/train/checkpoints/step-*")),
                    600, 0.5, "a checkpoint copied home")
    stack.emu.set_faults(id=inst["id"], preempt_after_s=0, preempt_mode=mode, **knobs)
    notes.update(preempted_instance=inst["id"], checkpoint_home_at_preemption=ckpt[-1], preempted_at=time.time())


def act_preempt(stack, run_id, notes):
    _preempt(stack, run_id, notes, "exited")


def act_preempt_reclaimed(stack, run_id, notes):
    """Preempted, and the host gives the machine to another tenant: the replacement is another machine."""
    _preempt(stack, run_id, notes, "exited", host_reclaims=True)


def act_outbid(stack, run_id, notes):
    """Outbid: Vast stops the instance (disk kept, storage still billed) instead of ending it."""
    _preempt(stack, run_id, notes, "stopped")


def act_freeze_step(stack, run_id, notes):
    """Freeze (SIGSTOP) the train step on the machine before the budget is crossed: from then on it
    prints nothing, so only the budget timer (machine.budget_check_every_s) can see the spending."""
    inst = _remote_train_started(stack, run_id)
    info = stack.emu.instance_info(inst["id"])
    frozen = []
    for pid in instance_processes(Path(info["root"]), info.get("sshd_pid")):
        try:
            p = psutil.Process(pid)
            if "steps" in p.cmdline() and "train" in p.cmdline():
                p.suspend()
                frozen.append(pid)
        except psutil.Error:
            continue
    if not frozen:
        raise RuntimeError(f"no train step process found on instance {inst['id']}")
    billed = next(r["cost"] for r in stack.instances(run_id) if r["id"] == inst["id"])
    notes.update(frozen_pids=frozen, frozen_at=time.time(), billed_at_freeze_usd=round(billed, 6))


def silent_budget_overrides(stack, life_s: float = 150, check_s: float = 10) -> dict:
    """A cap that buys `life_s` of the cheapest matching machine: renting, setup and the start of
    training fit, then the frozen step sits silent until the timer finds the cap crossed."""
    from contract.config import load_config
    from contract.workload import run_workload
    from infra.backends.vast.instances import VastProvider

    cfg = load_config("tiny")
    dph = float(VastProvider(api_key=stack.api_key, server_url=stack.emu.url).search_offers(
        cfg.machine.vast, workload=run_workload(cfg))[0]["dph_total"])
    return {**LONG_TRAIN, "machine.max_cost_usd": round(dph * life_s / 3600, 6), "machine.planned_hours": 0.001,
            "machine.budget_check_every_s": check_s}


class ConnectCatcher:
    """A fake HTTPS proxy on loopback: every connection the process under test tries to open to an
    https:// address off this machine (HTTPS_PROXY, the Vast.ai console's included) lands here, is
    recorded (its CONNECT line) and refused."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.seen: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    self.seen.append(conn.recv(200).split(b"\r\n", 1)[0].decode(errors="replace"))
                except OSError:
                    self.seen.append("(nothing sent)")

    def close(self) -> None:
        self.sock.close()


def _emulator_api_requests(stack) -> int:
    """Vast.ai API requests the emulator has served (its log has one line per request; admin excluded)."""
    log = Path(stack.emu.state_dir) / "emulator.log"
    text = log.read_text(errors="replace") if log.is_file() else ""
    return len(re.findall(r"^(?:GET|POST|PUT|DELETE) /api/", text, re.M))


def _prefect_python(code: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def start_demo_then_real(stack, sc, notes, errors) -> str:
    """The demo stack sets itself up on this Prefect server (LocalStack.prefect_setup, its emulator key
    minted as `make demo` does), an older demo's leftover puts that key in `vast-api-key` too, then the
    real deployment qat/int8 runs as a worker started from the demo's shell would run it: the demo
    stack's environment plus the deployment's job variables, https traffic caught by ConnectCatcher."""
    from tasks.secrets import EMULATOR_KEY_PREFIX, VAST_SECRET_BLOCK

    key = EMULATOR_KEY_PREFIX + "chaos" + os.urandom(8).hex()
    base = {k: v for k, v in stack.env().items() if not k.startswith("VAST_")}
    setup = ("import os; from devtools.stack import LocalStack; from tasks.secrets import _secret_block; "
             "before = _secret_block(os.environ['QAT_REAL_BLOCK']); "
             "LocalStack().prefect_setup(os.environ['QAT_DEMO_KEY']); "
             "print('REAL_BLOCK_CHANGED', _secret_block(os.environ['QAT_REAL_BLOCK']) != before)")
    out = _prefect_python(setup, {**base, "QAT_DEMO_KEY": key, "QAT_REAL_BLOCK": VAST_SECRET_BLOCK}, 300)
    if out.returncode != 0:
        raise RuntimeError(f"the demo's Prefect setup failed: {out.stderr[-500:]}")
    notes["demo_wrote_vast_api_key"] = "REAL_BLOCK_CHANGED True" in out.stdout  # (a repeat finds the last leftover)
    leftover = ("import os; from prefect.blocks.system import Secret; "
                "Secret(value=os.environ['QAT_DEMO_KEY']).save(os.environ['QAT_REAL_BLOCK'], overwrite=True)")
    _prefect_python(leftover, {**base, "QAT_DEMO_KEY": key, "QAT_REAL_BLOCK": VAST_SECRET_BLOCK}, 120).check_returncode()
    real = deployment("qat/int8")
    worker_env = {k: v for k, v in LocalStack().service_env().items()
                  if not k.startswith(("PREFECT_",)) and k.lower() not in ("http_proxy", "https_proxy", "no_proxy", "all_proxy")}
    catcher = ConnectCatcher()
    before = (_emulator_api_requests(stack), len(stack.emu.ledger()["instances"]))
    env = {**worker_env, **{k: v for k, v in base.items() if k.startswith("PREFECT_") or k == "QAT_RUNS_DIR"},
           **deployment_env("qat/int8"), "HTTPS_PROXY": catcher.url, "https_proxy": catcher.url,
           # loopback stays direct: the Prefect server's events websocket; the emulator is counted by its log
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    run = ("import json; from flows.qat import qat; "
           f"s = qat(**{real['parameters']!r}, return_state=True); "
           "print('QAT_FLOW_RUN', s.state_details.flow_run_id)")
    try:
        out = _prefect_python(run, env, 600)
    finally:
        catcher.close()
    found = re.search(r"QAT_FLOW_RUN (\S+)", out.stdout)
    if not found:
        raise RuntimeError(f"the real deployment's run printed no flow run id: {out.stderr[-800:]}")
    requests_after, instances_after = _emulator_api_requests(stack), len(stack.emu.ledger()["instances"])
    notes.update(emulator_api_requests=requests_after - before[0], instances_created=instances_after - before[1],
                 https_connections=catcher.seen, deployment="qat/int8", worker_env_vast=sorted(
                     k for k in env if k.startswith("VAST_")))
    if notes["emulator_api_requests"] or notes["instances_created"] or catcher.seen:
        errors.append(f"the real run reached out: {notes['emulator_api_requests']} emulator API request(s), "
                      f"https connection(s) {catcher.seen}")
    if notes["demo_wrote_vast_api_key"]:
        errors.append("the demo's setup wrote the real Secret block 'vast-api-key'")
    return found.group(1)


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
    Scenario("baseline", "none", ("COMPLETED",), "runs every step, destroys the machine"),
    Scenario("preempt", "preemption mid-training (after a checkpoint came home)", ("COMPLETED",),
             "rents a new machine, resumes from the checkpoint copied home",
             overrides={"machine.checkpoint_sync_every_s": 2, "machine.ssh_timeout_s": 30}, action=act_preempt,
             resumes=True),
    Scenario("2gpu-baseline", "none, on a 2-GPU offer (2 CPU ranks)", ("COMPLETED",),
             "trains with 2 ranks, rank 0's checkpoints come home, destroys the machine", overrides=TWO_GPUS, gpus=(2,)),
    Scenario("2gpu-preempt-same", "a 2-GPU machine preempted mid-training; the replacement has 2 GPUs", ("COMPLETED",),
             "rents another 2-GPU machine, resumes from the checkpoint copied home with 2 ranks",
             overrides=TWO_GPUS, action=act_preempt, resumes=True, reference="2gpu-baseline", gpus=(2, 2)),
    Scenario("2gpu-preempt-fewer", "a 2-GPU machine preempted mid-training and given to another tenant "
             "(`host_reclaims`); `num_gpus: {min: 1, max: 2}`", ("COMPLETED",),
             "rents the cheapest machine left in the range (1 GPU), resumes with 1 rank and the same global batch",
             overrides={**TWO_GPUS, "machine.vast.num_gpus": {"min": 1, "max": 2}}, action=act_preempt_reclaimed, resumes=True,
             reference="2gpu-baseline", gpus=(2, 1), resharded=True),
    Scenario("outbid-stopped", "outbid mid-training: Vast stops the instance (`preempt_mode: stopped`, storage still bills)",
             ("COMPLETED",), "sees the machine is no longer running, destroys it (a stopped one bills storage), "
             "rents another and resumes from the checkpoint copied home",
             overrides={"machine.checkpoint_sync_every_s": 2, "machine.ssh_timeout_s": 30}, action=act_outbid,
             resumes=True),
    Scenario("kill-worker", "SIGKILL of the runner and the flow process mid-training", ("RUNNING",),
             "nothing fires; the `reap` deployment, on its own worker, sees no heartbeat and destroys the machine "
             "after two \"gone\" verdicts in a row", overrides=LONG_TRAIN, action=act_kill_all, final=False),
    Scenario("cancel", "cancel from the API mid-training", ("CANCELLED",), "SIGTERM: the flow's `finally` destroys",
             overrides=LONG_TRAIN, action=act_cancel),
    Scenario("budget", "budget cap crossed (machine.max_cost_usd $0.002)", ("FAILED",),
             "`BudgetExceeded` on an output line, machine destroyed",
             overrides={"machine.max_cost_usd": 0.002, "machine.planned_hours": 0.001}, message="budget"),
    Scenario("silent-budget", "a step that prints nothing while the budget is crossed (train frozen, cap = 150 s of machine)",
             ("FAILED",), "the budget timer (`machine.budget_check_every_s`, 10 s here) finds the cap crossed, stops "
             "the command and destroys the machine", action=act_freeze_step, prepare=silent_budget_overrides,
             message="budget"),
    Scenario("disk-full", "rented disk full (30 MB tmpfs)", ("FAILED",),
             "deterministic step error naming the disk, not retried; error.json home", faults={"disk_full_mb": 30},
             message="disk"),
    Scenario("ssh-drop", "SSH sessions killed mid-training", ("COMPLETED",),
             "the step is retried on a new connection (`--resume`: from the last checkpoint)", action=act_drop_ssh),
    Scenario("destroy-fails", "first destroy answers 500", ("COMPLETED",), "destroy is retried and confirmed by polling",
             faults={"destroy_fail_once": True}),
    Scenario("destroy-silent", "first destroy claims success but keeps the instance", ("COMPLETED",),
             "destroy is confirmed by polling and sent again", faults={"destroy_fail_once": "silent"}),
    Scenario("destroy-lag", "destroyed instance stays visible for 20 s (`destroy_lag_s`)", ("COMPLETED",),
             "sends DELETE again while the row is still shown; gone once show answers 404", faults={"destroy_lag_s": 20}),
    Scenario("http-429", "bursts of 4 x HTTP 429 on any endpoint, the next 15 s after one is spent", ("COMPLETED",),
             "backoff retries on every endpoint", action=act_429_bursts),
    Scenario("quota-429", "daily search quota exhausted (`quota_429`: JSON 429 search_quota_exceeded)", ("FAILED",),
             "fails before renting, not retried (the quota resets at UTC midnight), $0", faults={"quota_429": 10},
             message="quota", max_instances=0),
    Scenario("lost-create-504", "create answer lost: 504 gateway timeout (`lost_create`), the instance exists",
             ("COMPLETED",), "never re-sends the create: finds the instance by its label and uses it",
             faults={"lost_create": 1, "lost_create_mode": "504"}, max_instances=1),
    Scenario("lost-create-500", "create answer lost: 500 server_error, the instance exists", ("COMPLETED",),
             "never re-sends the create: finds the instance by its label and uses it",
             faults={"lost_create": 1, "lost_create_mode": "500"}, max_instances=1),
    Scenario("lost-create-drop", "create answer lost: connection dropped, the instance exists", ("COMPLETED",),
             "never re-sends the create: finds the instance by its label and uses it",
             faults={"lost_create": 1, "lost_create_mode": "drop"}, max_instances=1),
    Scenario("null-after-create", "show answers null for 20 s after create (`null_after_create_s`)", ("COMPLETED",),
             "keeps polling the new instance instead of taking it for gone", faults={"null_after_create_s": 20},
             max_instances=1),
    Scenario("list-lag", "instance list lags 30 s behind creation (`list_lag_s`)", ("COMPLETED",),
             "follows its machine by id (show); the list is read only to find machines by label", faults={"list_lag_s": 30},
             max_instances=1),
    Scenario("foreign-rows", "30 instances of other projects with null fields in the list (`foreign_rows`)",
             ("COMPLETED",), "ignores rows it cannot read or that are not its label; touches none of them",
             faults={"foreign_rows": 30}),
    Scenario("ssh-refused", "SSH refused for 25 s after `running`", ("COMPLETED",), "retries SSH until `ssh_timeout_s`",
             faults={"ssh_refuse_s": 25}),
    Scenario("stuck-loading", "first instance stuck in `loading` (provision timeout 15 s)", ("COMPLETED",),
             "gives up after `provision_timeout_s`, destroys it, rents another offer",
             overrides={"machine.provision_timeout_s": 15}, faults={"stuck_loading": True}, action=act_stuck_first),
    Scenario("demo-then-real", "`make demo`'s stack ran, then the real deployment qat/int8 runs on the same machine "
             "(an older demo left its emulator key in `vast-api-key`)", ("FAILED",),
             "refuses the emulator key for the real API before any request, naming the Secret block and how to "
             "fix it; the demo's own pools, block and endpoint are not the real ones", message="emulator's API key",
             max_instances=0, start=start_demo_then_real, config="int8"),
    Scenario("no-cuda", "a GPU run (`machine.gpu: required`) on a host whose driver supports only CUDA 12.4 "
             "while its offer row says 13.0 (`driver_cuda`)", ("FAILED",),
             "setup reads nvidia-smi before installing anything, fails fast naming the driver's and torch's CUDA, "
             "not retried; the machine is destroyed", overrides={"machine.gpu": "required"},
             faults={"driver_cuda": 12.4}, message="CUDA 12.4", max_instances=1),
    Scenario("bandwidth-price", "the cheapest offer (the emulator's $0.29/h RTX 4090) bills $2/GB of bandwidth each way; "
             "the run lifts `machine.vast.max_inet_cost_per_gb` to $5 and has $0.04 to spend", ("FAILED",),
             "rents it (its $/h is lowest: the tiny model's bytes are unknown before renting); every copy home is "
             "capped by the budget left at $2/GB, checked on the machine's size report before the transfer and on "
             "the bytes received during it, billed as they arrive: the run stops at the cap",
             overrides={"machine.vast.max_inet_cost_per_gb": 5, "machine.max_cost_usd": 0.04}, message="budget",
             max_instances=1),
    Scenario("image-torchvision", "the image's python carries a torchvision built for another torch, without "
             "`VideoReader` (`image_torchvision: no_video_reader`, what datasets 4.4.1 tripped on)", ("COMPLETED",),
             "the workload runs in its own venv: the image's packages never reach it",
             faults={"image_torchvision": "no_video_reader"}),
]

# Rows of README's table that a test measures rather than `make chaos`: (what happens, what the flow does, where).
TESTED_ELSEWHERE = [
    ("SIGTERM or SIGKILL of the flow process", "`finally` destroys (SIGTERM); the runner/worker fires `on_crashed`, "
     "which destroys by label (SIGKILL)", "tests/test_teardown.py"),
    ("garbled Vast.ai answers (HTML, empty, truncated, missing/wrong fields)",
     "`VastAPIError` naming the call; create sweeps by label", "tests/test_hostile.py; key never in a traceback"),
    ("secrets", "API key and HF token never in logs, artifacts, Prefect DB, run dir, rented disk or its processes",
     "tests/test_secrets.py (canaries)"),
]


# ---------------------------------------------------------------- measuring

def expected_files(stack: Stack, run_id: str, name: str, state_type: str, message: str = "") -> list[str]:
    """What must be home: result.json of every step that completed, error.json of a step that ran
    on the machine and failed there (StepFailed), and on success the converted model, the report
    and the Prefect artifacts."""
    tasks = dict(stack.task_states(run_id))
    need = [f"work/{s}/result.json" for s in STEPS if tasks.get(s) == "COMPLETED"]
    need += [f"work/{s}/error.json" for s in STEPS if tasks.get(s) == "FAILED" and f"step {s} failed" in message]
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
    if not instances:
        return "nothing rented"
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


def billing_bound(instances: list[dict], max_cost_usd: float, check_every_s: float) -> float:
    """The most a run may be billed: its cap plus one budget check interval of every instance it rented
    (the budget is checked on every output line and every check interval; crossing it destroys)."""
    return round(max_cost_usd + sum(i["dph_total"] for i in instances) * check_every_s / 3600, 6)


def compare_weights(a: Path, b: Path, resharded: bool = False) -> dict:
    """Max abs difference of two trained models' weights (equal: within WEIGHT_ATOL); `resharded`: also
    |a - b| / |a - start| over every weight (equal: within RESHARDED_TOLERANCE), start = the tiny fixture."""
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
    out = {"compared": True, "tensors": n, "max_abs_diff": worst, "atol": WEIGHT_ATOL, "equal": worst <= WEIGHT_ATOL}
    if resharded:
        ratio = _off_course(fa, fb)
        out.update(apart_over_moved=ratio, tolerance=RESHARDED_TOLERANCE, equal=ratio <= RESHARDED_TOLERANCE)
    return out


def _off_course(fa: list[Path], fb: list[Path]) -> float:
    """How far two runs ended apart relative to how far training moved the first from the start."""
    from safetensors.numpy import load_file

    from steps.models import load_model

    start = {k: v.detach().double().numpy() for k, v in load_model("fixture:tiny-random").state_dict().items()}
    apart = moved = 0.0
    for x, y in zip(fa, fb):
        ta, tb = load_file(str(x)), load_file(str(y))
        for k in ta:
            a, b = ta[k].astype("float64"), tb[k].astype("float64")
            apart += float(((a - b) ** 2).sum())
            moved += float(((a - start[k]) ** 2).sum())
    return round((apart ** 0.5) / (moved ** 0.5), 6) if moved else float("inf")


def _submit_and_wait(stack: Stack, sc: Scenario, overrides: dict, notes: dict, errors: list[str]) -> str:
    run_id = stack.submit(config=sc.config, overrides=overrides)
    th = None
    if sc.action:
        def act():
            try:
                sc.action(stack, run_id, notes)
            except Exception as e:  # the scenario failed to inject its fault: reported, not hidden
                errors.append(f"fault injection failed: {type(e).__name__}: {e}")
        th = threading.Thread(target=act, daemon=True)
        th.start()
    if sc.final:
        try:
            stack.wait_final(run_id, 1800)
        except TimeoutError as e:
            errors.append(str(e))
    if th is not None:
        th.join(timeout=900)
    return run_id


def run_scenario(stack: Stack, sc: Scenario, baseline: Optional[dict], reference: Optional[dict] = None) -> dict:
    """One run of the scenario, measured: a row of chaos.json (`reference`: the run a resumed model must
    equal, the baseline's when None)."""
    from contract.config import load_config

    stack.emu.clear_faults()
    glob_faults = {k: v for k, v in sc.faults.items() if k in GLOBAL_KNOBS}
    inst_faults = {k: v for k, v in sc.faults.items() if k not in GLOBAL_KNOBS}
    if inst_faults:
        stack.emu.set_faults(label_prefix="qat-", **inst_faults)
    name = f"chaos-{sc.name}"
    shutil.rmtree(stack.runs_dir / name, ignore_errors=True)
    overrides = {} if sc.start else {**COMMON, "name": name, **sc.overrides, **(sc.prepare(stack) if sc.prepare else {})}
    cfg = load_config(sc.config, overrides)
    if glob_faults:  # global counters count every call: set last, just before the run
        stack.emu.set_faults(**glob_faults)
    t0 = time.time()
    notes: dict = {}
    errors: list[str] = []
    run_id = (sc.start or (lambda st, s, n, e: _submit_and_wait(st, s, overrides, n, e)))(stack, sc, notes, errors)
    state = stack.state(run_id)
    # Hooks and a retried destroy may finish a moment after the state: give them 60 s.
    try:
        wait_for(lambda: not stack.live(run_id), 60, 1, "teardown")
    except TimeoutError:
        pass
    counters = stack.emu.admin("GET", "/_emulator/faults")
    unfired = [k for k in GLOBAL_COUNTERS if k in glob_faults and counters.get(k) == glob_faults[k]]
    stack.emu.clear_faults()
    instances = stack.instances(run_id)
    leaked = [i["id"] for i in instances if i["ended_at"] is None]
    cost = round(sum(i["cost"] for i in instances), 6)
    bound = billing_bound(instances, cfg.machine.max_cost_usd, cfg.machine.budget_check_every_s)
    missing = expected_files(stack, run_id, cfg.name, state.type.value, state.message or "")
    row = {"scenario": sc.name, "fault": sc.fault, "run_id": run_id, "expected": list(sc.expect),
           "final_state": state.type.value, "message": (state.message or "")[:400], "seconds": round(time.time() - t0, 1),
           "instances": [{k: i.get(k) for k in ("id", "end_reason", "seconds", "cost", "dph_total", "bytes_up", "bytes_down",
                                                "bandwidth_cost")} for i in instances],
           "leaked": leaked, "lost_artifacts": missing, "cost_usd": cost,
           "max_cost_usd": cfg.machine.max_cost_usd, "budget_check_every_s": cfg.machine.budget_check_every_s,
           "bound_usd": bound, "within_bound": cost <= bound,
           "wasted_usd": round(max(0.0, cost - baseline["cost_usd"]), 6) if baseline else None,
           "abandoned_usd": abandoned_usd(instances, state.type.value),
           "teardown_by": teardown_layer(stack, run_id, instances, notes), "notes": notes, "errors": errors}
    why = []
    if state.type.value not in sc.expect:
        why.append(f"ended {state.type.value}, expected {'/'.join(sc.expect)}")
    elif sc.message and sc.message.lower() not in (state.message or "").lower():
        why.append(f"message lacks {sc.message!r}")
    why += [f"leaked instances {leaked}"] if leaked else []
    why += [f"billed ${cost} > bound ${bound}"] if cost > bound else []
    why += [f"the fault never fired: {unfired} unspent"] if unfired else []
    why += [f"{len(instances)} instances rented, at most {sc.max_instances} allowed"] \
        if sc.max_instances is not None and len(instances) > sc.max_instances else []
    got_gpus = tuple(int(i.get("num_gpus") or 0) for i in sorted(instances, key=lambda i: i["id"]))
    why += [f"machines with {list(got_gpus)} GPUs, expected {list(sc.gpus)}"] if sc.gpus and got_gpus != sc.gpus else []
    if sc.gpus:
        row["gpus"], row["train_world_size"] = list(got_gpus), _train_world_size(stack, name, run_id)
    if sc.resumes:
        why += [f"only {len(instances)} instance(s): the machine was not replaced"] if len(instances) < 2 else []
        ref = reference or baseline
        if ref and ref.get("model_dir"):
            row["weights_vs_baseline"] = compare_weights(run_dir_of(stack, name, run_id) / "work/train/model",
                                                         Path(ref["model_dir"]), sc.resharded)
            row["weights_reference"] = sc.reference
            if not row["weights_vs_baseline"].get("equal"):
                why.append(f"resumed weights differ from {sc.reference}'s: {row['weights_vs_baseline']}")
        else:
            why.append(f"no {sc.reference} model to compare the resumed weights with")
    if sc.name == "silent-budget" and notes.get("billed_at_freeze_usd", 0) >= cfg.machine.max_cost_usd:
        why.append("the step was frozen after the cap was crossed: the timer was not what stopped it")
    if any(s.resumes and s.reference == sc.name for s in SCENARIOS) and state.type.value == "COMPLETED":
        keep = Path(tempfile.mkdtemp(prefix="chaos-baseline-model-"))
        shutil.copytree(run_dir_of(stack, name, run_id) / "work/train/model", keep, dirs_exist_ok=True)
        row["model_dir"] = str(keep)
    why += errors
    row["ended_correctly"] = not why
    row["reason"] = "; ".join(why)
    return row


def _train_world_size(stack: Stack, name: str, run_id: str) -> Optional[int]:
    """The ranks the train step's result.json (at home) says trained last."""
    result = run_dir_of(stack, name, run_id) / "work/train/result.json"
    try:
        return json.loads(result.read_text()).get("metrics", {}).get("world_size")
    except (OSError, ValueError):
        return None


RUN_FIELDS = ("run_id", "final_state", "ended_correctly", "cost_usd", "bound_usd", "within_bound", "seconds", "reason")


def run_summary(row: dict) -> dict:
    """One run as chaos.json keeps it in a scenario's `runs`."""
    return {**{k: row.get(k) for k in RUN_FIELDS}, "instances": len(row.get("instances", [])),
            "leaked": len(row.get("leaked", [])), "lost_artifacts": len(row.get("lost_artifacts", []))}


def runs_of(entry: dict) -> list[dict]:
    """The runs recorded for a scenario (a row from before --repeat is its one run)."""
    return entry.get("runs") or [run_summary(entry)]


def scenario_entry(rows: list[dict]) -> dict:
    """A scenario's entry in chaos.json: its first failing run (else its last) in full, plus every run."""
    shown = next((r for r in rows if not r["ended_correctly"]), rows[-1])
    return {**shown, "runs": [run_summary(r) for r in rows], "ended_correctly": all(r["ended_correctly"] for r in rows)}


# ---------------------------------------------------------------- report

def render(rows: list[dict], findings: list[str] = (), note: str = "") -> str:
    ok = sum(r["ended_correctly"] for r in rows)
    lines = ["# Chaos bench", "",
             "Generated by `make chaos` (`.venv/bin/python -m benchmarks.chaos`): each run is one real `qat` flow run",
             "(tiny model, Vast.ai emulator with real sshd instances, Prefect server + Runner) under one fault.",
             *([f"Note: {note}."] if note else []),
             f"Common overrides: `{json.dumps(COMMON)}`; interrupted runs use `train.max_steps: 400`.", "",
             f"**{ok}/{len(rows)} scenarios ended correctly in every run; leaked instances: "
             f"{sum(r['leaked'] for e in rows for r in runs_of(e))}; lost artifacts: "
             f"{sum(r['lost_artifacts'] for e in rows for r in runs_of(e))}.**"
             + "".join(f" Not measured yet: {', '.join(m)}." for m in [[s.name for s in SCENARIOS if s.name not in
                                                                         {r['scenario'] for r in rows}]] if m), "",
             "| scenario | fault | ended | runs ok | leaked | lost artifacts | cost $ | bound $ | beyond baseline $ | "
             "abandoned machines $ | teardown by | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        runs = runs_of(r)
        wasted = "" if r.get("wasted_usd") is None else f"{r['wasted_usd']:.4f}"
        bound = "-" if r.get("bound_usd") is None else f"{r['bound_usd']:.4f}"
        lines.append(f"| {r['scenario']} | {r['fault']} | {r['final_state']} | "
                     f"{sum(x['ended_correctly'] for x in runs)}/{len(runs)} | "
                     f"{sum(x['leaked'] for x in runs)} | {sum(x['lost_artifacts'] for x in runs)} | {r['cost_usd']:.4f} | "
                     f"{bound} | {wasted} | {r.get('abandoned_usd', 0.0):.4f} | {r['teardown_by']} | {r['seconds']:.0f} |")
    lines += ["", "One row per scenario: its first failing run, else its last; runs ok counts every run, leaked and "
              "lost artifacts add up every run. Cost = the emulator ledger's bill for the run's instances. Bound = "
              "machine.max_cost_usd plus one budget check interval (machine.budget_check_every_s) of every instance's "
              "$/h: a run billed more fails. Beyond baseline = cost minus the clean "
              "baseline run's bill (0 when cheaper; on a shared machine run times, hence bills, vary by about +-40 %). "
              "Abandoned machines = the bill of instances that did not carry the run to a successful end "
              "(stuck, preempted, killed, or all of them when the run failed by design).", "", "## Details", ""]
    for r in rows:
        lines.append(f"- **{r['scenario']}**: {r['final_state']}" + (f" - {r['reason']}" if r["reason"] else "")
                     + (f"; state message: {r['message'][:200]!r}" if r["message"] else ""))
        lines.append(f"  instances: {[(i['id'], i['end_reason'], round(i['seconds'])) for i in r['instances']]}"
                     + (f"; notes: {json.dumps({k: v for k, v in r['notes'].items() if k != 'reaped'})}" if r["notes"] else ""))
        if len(runs_of(r)) > 1:
            lines.append("  runs: " + "; ".join(f"{x['final_state']} {'ok' if x['ended_correctly'] else 'NOT ok'} "
                                                f"${x['cost_usd']:.4f} {x['seconds']:.0f} s" for x in runs_of(r)))
        if r["lost_artifacts"]:
            lines.append(f"  missing: {r['lost_artifacts']}")
        if "weights_vs_baseline" in r:
            lines.append(f"  weights vs baseline: {json.dumps(r['weights_vs_baseline'])}")
    if findings:
        lines += ["", "## Findings while measuring (earlier runs of the same scenarios)", ""]
        lines += [f"- {f}" for f in findings]
    return "\n".join(lines) + "\n"


def _measured(entry: dict) -> str:
    runs = runs_of(entry)
    ok = sum(r["ended_correctly"] for r in runs)
    states = "/".join(sorted({r["final_state"] for r in runs}))
    bill = max(r["cost_usd"] for r in runs)
    bounds = [r["bound_usd"] for r in runs if r.get("bound_usd") is not None]
    text = (f"{states}, as expected in {ok}/{len(runs)} run(s); {sum(r['leaked'] for r in runs)} leaked, "
            f"{sum(r['lost_artifacts'] for r in runs)} artifacts lost; billed up to ${bill:.4f}")
    text += f" (bound ${max(bounds):.4f})" if bounds else " (bound not recorded)"
    weights = entry.get("weights_vs_baseline") or {}
    text += f"; resumed weights vs the clean run: max abs diff {weights['max_abs_diff']}" if weights.get("compared") else ""
    text += (f" (apart / moved {weights['apart_over_moved']:g}, tolerance {weights['tolerance']:g})"
             if weights.get("apart_over_moved") is not None else "")
    text += f"; GPUs per machine {entry['gpus']}, trained last on {entry['train_world_size']} rank(s)" if entry.get("gpus") else ""
    notes = entry.get("notes", {})
    if "emulator_api_requests" in notes:
        text += (f"; {notes['emulator_api_requests']} emulator API requests, "
                 f"{len(notes.get('https_connections', []))} https connections")
    after = notes.get("destroyed_after_s")
    text += f"; destroyed {after} s after the kill" if after is not None else ""
    return text + ("" if entry.get("teardown_by") in (None, "", "flow finally (destroy machine task)")
                   else f"; teardown by {entry['teardown_by']}")


def render_readme_section(data: dict) -> str:
    """README's "What survives what" table from chaos.json: every scenario, "not measured yet" without a run."""
    by_name = {r["scenario"]: r for r in data.get("scenarios", [])}
    measured = [by_name[s.name] for s in SCENARIOS if s.name in by_name]
    missing = [s.name for s in SCENARIOS if s.name not in by_name]
    ok = sum(e["ended_correctly"] for e in measured)
    lines = [README_START,
             f"From `benchmarks/chaos.json` (generated {data.get('generated_at', 'never')}): {ok}/{len(measured)} "
             f"measured scenarios ended as they should in every run; "
             f"{sum(r['leaked'] for e in measured for r in runs_of(e))} instances leaked, "
             f"{sum(r['lost_artifacts'] for e in measured for r in runs_of(e))} artifacts lost"
             + (f"; not measured yet: {', '.join(missing)}." if missing else "."), "",
             "| what happens | what the flow does | measured |", "|---|---|---|"]
    for sc in SCENARIOS:
        if sc.name == "baseline":
            continue
        cell = _measured(by_name[sc.name]) if sc.name in by_name else "not measured yet"
        lines.append(f"| {sc.fault} | {sc.does} | {cell} |")
    lines += [f"| {what} | {does} | {where} |" for what, does, where in TESTED_ELSEWHERE]
    return "\n".join(lines + [README_END])


def render_readme(readme: str, data: dict) -> str:
    """README text with the section between the chaos-table markers replaced by render_readme_section."""
    start, end = readme.find(README_START), readme.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"README.md lacks the markers {README_START!r} ... {README_END!r}")
    return readme[:start] + render_readme_section(data) + readme[end + len(README_END):]


def save(rows_by_name: dict) -> None:
    order = [s.name for s in SCENARIOS]
    rows = sorted(rows_by_name.values(), key=lambda r: order.index(r["scenario"]) if r["scenario"] in order else 99)
    old = json.loads(OUT_JSON.read_text()) if OUT_JSON.is_file() else {}
    findings, note = old.get("findings", []), old.get("note", "")
    OUT_JSON.write_text(json.dumps({"generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                    "common_overrides": COMMON, **({"note": note} if note else {}),
                                    "scenarios": rows, "findings": findings}, indent=1) + "\n")
    OUT_MD.write_text(render(rows, findings, note))


def harness_error(stack: Stack, sc: Scenario, e: Exception) -> dict:
    """A row saying the harness itself broke; any live instance is destroyed (it would bill the next scenario)."""
    from infra.backends.vast.instances import VastProvider

    live = [i["id"] for i in stack.emu.live_instances()]
    for i in live:
        VastProvider(api_key=stack.api_key, server_url=stack.emu.url).destroy(int(i))
    return {"scenario": sc.name, "fault": sc.fault, "final_state": "HARNESS_ERROR", "ended_correctly": False,
            "reason": f"{type(e).__name__}: {e}", "leaked": live, "lost_artifacts": [], "cost_usd": 0.0,
            "wasted_usd": None, "teardown_by": "", "seconds": 0, "instances": [], "notes": {}, "message": ""}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help="comma-separated scenario names (the baseline runs first when a resume is compared)")
    p.add_argument("--repeat", type=int, default=2, help="runs per scenario (default 2); chaos.json keeps every run")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    p.add_argument("--keep", help="keep the stack's files (logs, runs, emulator state) in this directory")
    p.add_argument("--out", help="write OUT.json / OUT.md instead of benchmarks/chaos.json / benchmarks/CHAOS.md "
                                 "(the baseline is still read from benchmarks/chaos.json)")
    p.add_argument("--render-readme", action="store_true",
                   help="rewrite README.md's \"What survives what\" table from benchmarks/chaos.json and exit")
    args = p.parse_args(argv)
    global OUT_JSON, OUT_MD
    if args.render_readme:
        README.write_text(render_readme(README.read_text(), json.loads(OUT_JSON.read_text())))
        print(f"chaos: rewrote the chaos table of {README} from {OUT_JSON}")
        return 0
    main_json = OUT_JSON
    if args.out:
        OUT_JSON, OUT_MD = Path(args.out + ".json"), Path(args.out + ".md")
    if args.list:
        for s in SCENARIOS:
            print(f"{s.name:18} {s.fault}")
        return 0
    if args.repeat < 1:
        p.error("--repeat must be 1 or more")
    names = [s.name for s in SCENARIOS] if not args.only else args.only.split(",")
    unknown = set(names) - {s.name for s in SCENARIOS}
    if unknown:
        p.error(f"unknown scenario(s) {sorted(unknown)}; --list shows them")
    previous = json.loads(OUT_JSON.read_text()) if OUT_JSON.is_file() else {"scenarios": []}
    rows = {r["scenario"]: r for r in previous.get("scenarios", [])}
    if "baseline" not in rows and main_json.is_file():
        rows["baseline"] = next((r for r in json.loads(main_json.read_text())["scenarios"] if r["scenario"] == "baseline"), {})
    baseline = rows.get("baseline") or None
    for ref in {s.reference for s in SCENARIOS if s.name in names and s.resumes}:  # run first when its model is gone
        if ref not in names and not Path((rows.get(ref) or {}).get("model_dir") or "/nonexistent").is_dir():
            names.insert(0, ref)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="qat-chaos-"))
    print(f"chaos: stack in {root}", flush=True)
    with Stack(root) as stack:
        for sc in (s for s in SCENARIOS if s.name in names):
            runs = []
            for i in range(args.repeat):
                print(f"chaos: {sc.name} ({i + 1}/{args.repeat}): {sc.fault} ...", flush=True)
                try:
                    row = run_scenario(stack, sc, baseline, rows.get(sc.reference))
                except Exception as e:  # the harness itself broke: say so in the table
                    row = harness_error(stack, sc, e)
                runs.append(row)
                print(f"chaos: {sc.name}: {'ok' if row['ended_correctly'] else 'FAILED: ' + row['reason']} "
                      f"({row['final_state']}, {row['seconds']}s, leaked {len(row['leaked'])}, "
                      f"lost {len(row['lost_artifacts'])}, ${row['cost_usd']})", flush=True)
            if sc.name == "baseline":
                baseline = next((r for r in runs if r.get("model_dir")), runs[-1])
            rows[sc.name] = scenario_entry(runs)
            save(rows)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    bad = [r["scenario"] for r in rows.values() if not r["ended_correctly"]]
    print(f"chaos: wrote {OUT_JSON} and {OUT_MD}; "
          f"{'all ended correctly' if not bad else 'not correct: ' + ', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
