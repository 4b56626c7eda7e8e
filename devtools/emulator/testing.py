"""Helpers behind the pytest fixtures `emulator` and `sshd_host` (tests/conftest.py).

`SshdHost`: a plain sshd on loopback (login root, HOME = a temp disk dir, key auth only).
`EmulatorProcess`: `python -m devtools.emulator` in a subprocess, with admin helpers.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from devtools.emulator.sshd import Sshd, SshdError, free_port, make_client_key, sshd_pids_under

REPO = Path(__file__).resolve().parents[2]


@dataclass
class SshdHost:
    """A real sshd for SSH round-trip tests: connect as `user` to host:port with key_path."""

    host: str
    port: int
    user: str
    key_path: Path          # private key (ed25519, OpenSSH format); public key at key_path + ".pub"
    home: Path              # the remote HOME and cwd (also where SFTP lands)
    host_key: str           # "ssh-ed25519 AAAA..." of the server, for pinning
    sshd: Sshd = field(repr=False)

    def stop(self) -> None:
        self.sshd.stop()

    def start(self) -> None:
        self.sshd.start()


def start_sshd_host(root: Path) -> SshdHost:
    """Start a plain sshd under root (root/disk is HOME) with a fresh client key authorized."""
    pub = None
    for attempt in range(3):  # sshd cannot report a port it chose: a port taken since free_port() gets another
        sshd = Sshd(root, free_port())
        sshd.prepare()
        pub = pub or make_client_key(root / "client_key")
        sshd.authorize(pub)
        try:
            sshd.start()
            break
        except SshdError as e:
            if "Address already in use" not in str(e) or attempt == 2:
                raise
    return SshdHost("127.0.0.1", sshd.port, "root", root / "client_key", sshd.disk, sshd.host_key_pub, sshd)


class EmulatorProcess:
    """The emulator as a subprocess: .url, .api_key, .set_faults(...), .ledger(), .restart(), .stop()."""

    def __init__(self, state_dir: Optional[Path] = None, api_key: str = "test-emulator-key",
                 boot_seconds: float = 0.6, extra_args: tuple[str, ...] = ()):
        self._own_dir = state_dir is None
        self.state_dir = Path(state_dir or tempfile.mkdtemp(prefix="vast-emulator-"))
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.api_key = api_key
        self.boot_seconds = boot_seconds
        self.extra_args = tuple(extra_args)
        self.port = 0  # the first start binds any free port and reports it; a restart keeps it
        self.url = ""
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 20.0) -> "EmulatorProcess":
        log = open(self.state_dir / "emulator.log", "ab")
        offset = log.tell()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "devtools.emulator", "--port", str(self.port), "--state-dir", str(self.state_dir),
             "--api-key", self.api_key, "--boot-seconds", str(self.boot_seconds), *self.extra_args],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"emulator exited with {self.proc.returncode}:\n{self.log_tail()}")
            with open(self.state_dir / "emulator.log", "rb") as f:
                f.seek(offset)
                ready = re.search(rb"^EMULATOR_READY (http://127\.0\.0\.1:(\d+)) ", f.read(), re.M)
            if ready:
                self.url, self.port = ready.group(1).decode(), int(ready.group(2))
                self.admin("GET", "/_emulator/health")
                return self
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"emulator did not answer on {self.url} within {timeout}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join((self.state_dir / "emulator.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        """Call an /_emulator/ admin endpoint; returns parsed JSON."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{method} {path} -> {e.code}: {e.read().decode(errors='replace')}") from None

    def set_faults(self, id: Optional[int] = None, label_prefix: Optional[str] = None, **faults: Any) -> dict:
        """Set fault knobs globally, for one instance id, or for labels starting with label_prefix."""
        body = dict(faults)
        if id is not None:
            body["id"] = id
        if label_prefix is not None:
            body["label_prefix"] = label_prefix
        return self.admin("POST", "/_emulator/faults", body)

    def clear_faults(self) -> dict:
        return self.admin("POST", "/_emulator/faults", {"clear": True})

    def ledger(self) -> dict:
        """{"instances": [{id, label, dph_total, created_at, ended_at, seconds, cost, status}], "total_cost", "balance"}."""
        return self.admin("GET", "/_emulator/ledger")

    def instance_info(self, instance_id: int) -> dict:
        """Admin view of one instance: disk path, host key, pids, faults."""
        return self.admin("GET", f"/_emulator/instances/{instance_id}")

    def live_instances(self) -> list[dict]:
        return [r for r in self.ledger()["instances"] if r["ended_at"] is None]

    def sshd_pids(self) -> list[int]:
        return sshd_pids_under(self.state_dir)

    def stop(self, kill_instances: bool = True) -> None:
        """Shut the emulator down; with kill_instances, every sshd it started dies too."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self.admin("POST", "/_emulator/shutdown", {"kill_instances": kill_instances})
                self.proc.wait(timeout=15)
            except (OSError, RuntimeError, subprocess.TimeoutExpired):
                self.kill()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL the server process only (instances' sshd keep running: a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> "EmulatorProcess":
        """Stop the server (leaving instances running) and start it again on the same state dir."""
        self.stop(kill_instances=False)
        return self.start()

    def cleanup(self) -> None:
        """Stop everything and remove the state dir (if we made it)."""
        self.stop(kill_instances=True)
        if self._own_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)
