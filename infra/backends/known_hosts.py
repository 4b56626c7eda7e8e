"""Host keys of the `ssh` backend's hosts, pinned across runs: one line per host:port in OpenSSH's
known_hosts format, in `known_hosts` of the runs folder (`$QAT_RUNS_DIR`, default `runs/`, as
tasks/run_dir.py), never the user's ~/.ssh. First contact records the key; a later run accepts only
that key. Vast.ai machines are not kept here: each is new, pinned from its provider log.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from contract.layout import REPO_ROOT


def default_path() -> Path:
    return Path(os.environ.get("QAT_RUNS_DIR") or REPO_ROOT / "runs") / "known_hosts"


def host_entry(host: str, port: int) -> str:
    """OpenSSH's name for a host in known_hosts: `host`, or `[host]:port` off port 22."""
    host = host.lower()
    return host if int(port) == 22 else f"[{host}]:{int(port)}"


def pinned_key(path: Path, host: str, port: int) -> Optional[str]:
    """The key pinned for host:port ("ssh-ed25519 AAAA..."), or None on first contact."""
    name = host_entry(host, port)
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) >= 3 and not fields[0].startswith("#") and name in fields[0].split(","):
            return f"{fields[1]} {fields[2]}"
    return None


def record(path: Path, host: str, port: int, key: str) -> None:
    """Append the host's key (file 0600, created when missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(f"{host_entry(host, port)} {key}\n")
