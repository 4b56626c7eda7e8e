"""devtools.stack's process handling: `down` leaves no process of the stack behind, even one that
ignores SIGTERM (as the Prefect worker does once its server is gone) or one that left the group."""
from __future__ import annotations

import json
import sys
import time

import psutil
import pytest

from devtools.services import start_service, stop_service
from devtools.stack import LocalStack

# A service that ignores SIGTERM (forwards SIGINT to itself, which it also ignores), with a child in its
# process group that ignores SIGTERM too, and a grandchild in a session of its own (like the emulator's
# sshd). It writes the pids of all three to argv[1] once they run.
TREE = r"""
import json, os, signal, subprocess, sys, time
ignore = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(600)"
signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
signal.signal(signal.SIGINT, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", ignore])
loner = subprocess.Popen([sys.executable, "-c", ignore], start_new_session=True)
time.sleep(0.5)
open(sys.argv[1], "w").write(json.dumps([os.getpid(), child.pid, loner.pid]))
while True:
    time.sleep(1)
"""


def _start_tree(tmp_path, stack: LocalStack | None = None):
    pids_file = tmp_path / "pids.json"
    argv = [sys.executable, "-c", TREE, str(pids_file)]
    if stack is not None:
        svc = stack.start("worker", argv)
    else:
        svc = start_service("worker", argv, tmp_path / "worker.log")
    deadline = time.monotonic() + 20
    while not pids_file.is_file() or not pids_file.read_text():
        assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text() if not stack else "no pids"
        time.sleep(0.05)
    pids = json.loads(pids_file.read_text())
    procs = [psutil.Process(p) for p in pids]
    assert all(p.is_running() for p in procs)
    return svc, procs


def _alive(procs: list[psutil.Process]) -> list[int]:
    return [p.pid for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.fixture
def started():
    """Processes a test started; whatever survives its test is killed (by pid) afterwards."""
    procs: list[psutil.Process] = []
    yield procs
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass


def test_stop_service_kills_what_ignores_sigterm(tmp_path, started):
    svc, procs = _start_tree(tmp_path)
    started += procs
    assert stop_service(svc, grace=1.0) == []
    assert _alive(procs) == [], "a process of the service survived stop_service"


def test_down_leaves_no_process_behind(tmp_path, started):
    stack = LocalStack(root=tmp_path, stack_dir=tmp_path / ".stack")
    svc, procs = _start_tree(tmp_path, stack)
    started += procs
    assert stack.status()["worker"] == svc.pid
    # `down` runs in another process than `up`: only the pid file tells it what to stop.
    assert LocalStack(root=tmp_path, stack_dir=tmp_path / ".stack").down(grace=1.0) == []
    assert _alive(procs) == [], "a process of the stack survived down"
    assert stack.status() == {name: None for name in LocalStack.SERVICES}


def test_a_service_that_exits_on_sigterm_is_not_killed(tmp_path):
    svc = start_service("polite", [sys.executable, "-c", "import time; time.sleep(600)"], tmp_path / "polite.log")
    assert svc.alive()
    assert stop_service(svc, grace=10.0) == []
    assert svc.proc.returncode == -15  # SIGTERM did it, no SIGKILL needed


def test_files_a_service_creates_are_private(tmp_path):
    """The Prefect server's database holds Secret blocks and their key: nobody else may read it."""
    svc = start_service("writer", [sys.executable, "-c", "open('db.sqlite', 'w').write('x')"], tmp_path / "w.log",
                        cwd=tmp_path)
    svc.proc.wait(timeout=30)
    assert (tmp_path / "db.sqlite").stat().st_mode & 0o077 == 0
