"""The credentials never leak: a full tiny run (Prefect server + Runner, Vast.ai emulator with real
sshd, upload to a local Hub) with recognisable fake secrets, then forced failures. The canaries must
appear nowhere: Prefect logs and database, artifacts, the flow processes' output, the run directory,
the rented disk and its processes (scanned while the instance is alive), error messages. The
secrets reach the flows through Prefect Secret blocks, as the README recommends."""
from __future__ import annotations

import secrets
import threading
import time
from pathlib import Path

import psutil
import pytest

from hub_server import hub_fixture

pytestmark = pytest.mark.slow

VAST_CANARY = "vastkey-CANARY-" + secrets.token_hex(12)
HF_CANARY = "hf_CANARY" + secrets.token_hex(12)
CANARIES = (VAST_CANARY.encode(), HF_CANARY.encode())
REPO_ID = "canary/secrets-test"
FAST = {"train.max_steps": 2, "train.save_every": 2, "train.eval_every": 2, "data.max_eval_samples": 2,
        "bench.max_clips": 1, "eval.bootstrap_samples": 20, "hub.repo_id": REPO_ID}


def hits_in_tree(root: Path, since: float = 0.0, skip: tuple[Path, ...] = ()) -> tuple[int, list[str]]:
    """(files read, 'path: canary' for each file holding a canary) under root, files changed since `since`."""
    n, hits = 0, []
    for p in Path(root).rglob("*"):
        try:
            if not p.is_file() or p.is_symlink() or any(p.is_relative_to(s) for s in skip) or p.stat().st_mtime < since:
                continue
            data = p.read_bytes()
        except OSError:
            continue  # vanished while we looked (the run goes on)
        n += 1
        hits += [f"{p}: {c[:16].decode()}..." for c in CANARIES if c in data]
    return n, hits


def hits_in_text(where: str, text: str) -> list[str]:
    return [f"{where}: {c[:16].decode()}..." for c in CANARIES if c.decode() in text]


def test_the_scanner_finds_a_planted_canary(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "log.txt").write_bytes(b"token=" + CANARIES[1] + b"\n")
    assert hits_in_tree(tmp_path)[1] and hits_in_text("x", f"key {VAST_CANARY}")


class DiskWatch:
    """Scans the live instances' disks (files changed since the last pass) and the environment and
    command lines of every process running on them, every second until stopped."""

    def __init__(self, stack):
        self.stack, self.files, self.procs, self.hits = stack, 0, 0, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def loop(self):
        from devtools.emulator.sshd import ROOT_MARKER

        last = 0.0
        while not self.stop.is_set():
            started = time.time()
            for inst in self.stack.emu.live_instances():
                try:
                    root = Path(self.stack.emu.instance_info(inst["id"])["root"])
                except RuntimeError:
                    continue
                n, hits = hits_in_tree(root, since=last - 2)
                self.files += n
                self.hits += hits
            for p in psutil.process_iter():
                try:
                    env = p.environ()
                    if ROOT_MARKER not in env:
                        continue
                    self.procs += 1
                    self.hits += hits_in_text(f"process {p.pid} {p.name()} environment/command line",
                                              "\n".join(f"{k}={v}" for k, v in env.items()) + " ".join(p.cmdline()))
                except psutil.Error:
                    continue
            last = started
            self.stop.wait(1.0)


hub = hub_fixture({HF_CANARY: ("canary", "write")}, scope="module")


@pytest.fixture(scope="module")
def stack_options(hub) -> dict:
    # the route the README recommends: both secrets in Prefect Secret blocks, none in the environment
    return {"api_key": VAST_CANARY, "env": {"HF_TOKEN": HF_CANARY, "HF_ENDPOINT": hub.url}, "secret_blocks": True}


def _everything_the_run_left(stack, run_id: str) -> list[str]:
    hits = []
    for line in stack.logs(run_id):
        hits += hits_in_text("prefect log", line)
    for a in stack.artifacts(run_id):
        hits += hits_in_text(f"artifact {a.key}", f"{a.data} {a.description}")
    fr = stack.flow_run(run_id)
    hits += hits_in_text("flow run state/parameters", f"{fr.state.message} {fr.parameters}")
    hits += hits_in_text("flow processes' output (runner log)", stack.runner_text())
    return hits


def test_a_full_run_leaks_no_secret(stack, hub):
    watch = DiskWatch(stack)
    watch.thread.start()
    run_id = stack.submit(overrides={**FAST, "name": "secrets"})
    try:
        state = stack.wait_final(run_id, 1500)
    finally:
        watch.stop.set()
        watch.thread.join(timeout=60)
    assert state.type.value == "COMPLETED", state.message
    assert hub.repo_files(REPO_ID), "the upload did not happen, so the HF token was never used"
    assert watch.files > 20 and watch.procs > 0, "the rented disk / its processes were not scanned"
    hits = watch.hits + _everything_the_run_left(stack, run_id)
    hits += hits_in_tree(stack.runs_dir)[1]
    prefect_home = stack.root / "prefect-home"
    hits += hits_in_tree(prefect_home)[1]  # the server's database: logs, states, parameters, artifacts
    assert not hits, hits


def test_forced_failures_leak_no_secret(stack, hub):
    """An upload refused (token revoked on the Hub) and a garbled Vast.ai API: clear failures whose
    messages, logs and tracebacks hold neither secret."""
    hub.state.tokens.pop(HF_CANARY, None)  # the token is now unknown: 401 on upload
    run_id = stack.submit(overrides={**FAST, "name": "secrets"})  # every step is done: straight to upload
    state = stack.wait_final(run_id, 600)
    assert state.type.value == "FAILED" and "token" in (state.message or "").lower(), state.message
    assert not _everything_the_run_left(stack, run_id)

    stack.emu.set_faults(malformed="html", malformed_count=200)
    try:
        run_id = stack.submit(overrides={**FAST, "name": "secrets-garbled"})
        state = stack.wait_final(run_id, 600)
    finally:
        stack.emu.clear_faults()
    assert state.type.value == "FAILED" and "Vast.ai" in (state.message or ""), state.message
    assert not _everything_the_run_left(stack, run_id)
    assert not hits_in_tree(stack.runs_dir)[1] and not hits_in_tree(stack.root / "prefect-home")[1]
