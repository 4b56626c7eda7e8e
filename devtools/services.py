"""The stack's processes: each service started in its own session (so its own process group) by
`start_service`, and ended by `stop_service`: SIGTERM to the whole group, up to GRACE_S for the group
and every process the service had started to exit, then SIGKILL for the group and each survivor,
checked pid by pid. A process that ignores SIGTERM (the Prefect worker, whose server is already gone,
retries for minutes) therefore cannot outlive it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import psutil

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
BIN = Path(PY).parent          # the venv's bin: `prefect` lives beside its python
GRACE_S = 20.0                 # SIGTERM -> SIGKILL


def wait_for(cond: Callable[[], Any], timeout: float, every: float = 0.5, what: str = "condition") -> Any:
    """Poll cond() until it returns something truthy; TimeoutError naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def answers(url: str) -> bool:
    """Whether something answers HTTP at url (an error status counts: it is up)."""
    try:
        with urllib.request.urlopen(url, timeout=3):
            return True
    except urllib.error.HTTPError:
        return True
    except Exception:
        return False


# ---------------------------------------------------------------- processes

@dataclass
class Service:
    """A process started by start_service: the leader of its own session and process group."""

    name: str
    pid: int
    created: Optional[float]               # psutil create_time: tells our process from a reused pid
    log: Path
    proc: Optional[subprocess.Popen] = field(default=None, repr=False, compare=False)

    def process(self) -> Optional[psutil.Process]:
        """The leader, if it still runs (not a zombie, not another process under a reused pid)."""
        if self.proc is not None:
            self.proc.poll()               # reap it if it has exited
        try:
            p = psutil.Process(self.pid)
            if self.created is None or abs(p.create_time() - self.created) > 0.01:
                return None
            return p if p.status() != psutil.STATUS_ZOMBIE else None
        except psutil.Error:
            return None

    def alive(self) -> bool:
        return self.process() is not None

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "pid": self.pid, "created": self.created, "log": str(self.log)})

    @classmethod
    def from_file(cls, path: Path) -> Optional["Service"]:
        try:
            text = path.read_text().strip()
        except OSError:
            return None
        try:
            d = json.loads(text)
            return cls(d["name"], int(d["pid"]), d.get("created"), Path(d["log"]))
        except (ValueError, KeyError, TypeError):
            return None


def start_service(name: str, argv: list[str], log: Path, env: Optional[dict] = None, cwd: Path = REPO) -> Service:
    """Start argv in a new session (its own process group), output appended to log. Files it creates
    are private (umask 077): the Prefect database holds Secret blocks and the key that decrypts them."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, umask=0o077)
    try:
        created = psutil.Process(proc.pid).create_time()
    except psutil.Error:
        created = None
    return Service(name, proc.pid, created, log, proc)


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _members(svc: Service) -> list[psutil.Process]:
    """The leader, every process descended from it, and every process in its group or session
    (a child reparented to init after its parent died is found by its group)."""
    found: dict[int, psutil.Process] = {}
    leader = svc.process()
    if leader is not None:
        found[leader.pid] = leader
        try:
            found.update({c.pid: c for c in leader.children(recursive=True)})
        except psutil.Error:
            pass
    for p in psutil.process_iter():
        try:
            if p.pid not in found and svc.pid in (os.getpgid(p.pid), os.getsid(p.pid)):
                found[p.pid] = p
        except (OSError, psutil.Error):
            continue
    return [p for p in found.values() if _running(p)]


def _killpg(svc: Service, sig: int, procs: list[psutil.Process]) -> None:
    """Signal the service's process group, if one of our processes still belongs to it."""
    for p in procs:
        try:
            if _running(p) and os.getpgid(p.pid) == svc.pid:
                os.killpg(svc.pid, sig)
                return
        except (OSError, psutil.Error):
            continue


def _wait_gone(svc: Service, procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while True:
        if svc.proc is not None:
            svc.proc.poll()
        left = [p for p in procs if _running(p)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)


def stop_service(svc: Service, grace: float = GRACE_S) -> list[int]:
    """SIGTERM the service's process group, wait up to `grace` s for it and every process it had
    started, then SIGKILL the group and each survivor. Returns the pids still alive after that
    (none, unless a process cannot be killed)."""
    procs = _members(svc)
    if not procs:
        return []
    _killpg(svc, signal.SIGTERM, procs)
    for p in procs:  # descendants in sessions of their own (sshd, onstart scripts) get it too
        try:
            if os.getpgid(p.pid) != svc.pid:
                p.terminate()
        except (OSError, psutil.Error):
            pass
    left = _wait_gone(svc, procs, grace)
    if left:
        left = {p.pid: p for p in left + _members(svc)}.values()  # and whatever they started meanwhile
        _killpg(svc, signal.SIGKILL, list(left))
        for p in left:
            try:
                p.kill()
            except psutil.Error:
                pass
        left = _wait_gone(svc, list(left), 10)
    return sorted(p.pid for p in left)
