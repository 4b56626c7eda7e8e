"""The one interface every machine offers, wherever it runs (a Vast.ai instance, an SSH host
the user owns, or this machine). Flows and tasks only ever see a `Machine`.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Protocol, Sequence, runtime_checkable

LineCallback = Callable[[str], None]
LogFn = Callable[[str], None]


class MachineError(RuntimeError):
    """Talking to the machine failed (connection, transfer, disk)."""


class TransientMachineError(MachineError):
    """A failure worth retrying: dropped connection, timeout while connecting, 429."""


class CommandFailed(MachineError):
    """A remote command exited non-zero. Carries the exit code and the output tail."""

    def __init__(self, command: str, exit_code: int, tail: str):
        self.command, self.exit_code, self.tail = command, exit_code, tail
        super().__init__(f"command exited {exit_code}: {command}\n--- last output ---\n{tail}")


class CommandTimeout(TransientMachineError):
    def __init__(self, command: str, timeout: float, tail: str):
        self.command, self.timeout, self.tail = command, timeout, tail
        super().__init__(f"command timed out after {timeout:.0f}s: {command}\n--- last output ---\n{tail}")


def build_command(argv: Sequence[str], env: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None) -> str:
    """One shell command line from an argv list: every value is shlex-quoted, never pasted."""
    parts = []
    if cwd:
        parts.append(f"cd {shlex.quote(cwd)} &&")
    if env:
        parts.append("env " + " ".join(f"{k}={shlex.quote(str(v))}" for k, v in env.items()))
    parts.append(shlex.join(argv))
    return " ".join(parts)


@runtime_checkable
class Machine(Protocol):
    """A place to run steps. Paths are relative to the machine's home unless absolute."""

    name: str

    def run(self, argv: Sequence[str], *, env: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None,
            on_line: Optional[LineCallback] = None, timeout: Optional[float] = None, check: bool = True) -> int:
        """Run argv, streaming stdout+stderr lines to on_line as they arrive. Returns the exit code;
        raises CommandFailed (with the output tail) on non-zero when check, CommandTimeout on timeout."""

    def put(self, local_dir: Path, remote_dir: str, *, include: Sequence[str], respect_gitignore: bool = True) -> int:
        """Send a directory tree as one tar stream: the files git tracks under `include` (untracked ones
        stay home), or with respect_gitignore=False every file there (run outputs); returns its bytes
        (what the machine's host bills at its inet_down_cost)."""

    def get(self, remote_path: str, local_path: Path, *, max_bytes: int = ..., max_members: int = ...,
            allow: Optional[re.Pattern] = ..., exclude: Sequence[str] = (),
            on_bytes: Optional[Callable[[int], None]] = None) -> None:
        """Fetch a file, or a directory tree less the top-level names in `exclude`, as one checked
        archive (infra/machines/archive.py: regular files and directories only, names matching `allow`,
        caps on bytes and members); it replaces local_path only once every member passed.
        `on_bytes(n)`: each chunk's size as it arrives (billed bandwidth); raising aborts the copy."""

    def write_text(self, remote_path: str, text: str) -> None:
        """Write a small text file (parents created)."""

    def exists(self, remote_path: str) -> bool: ...

    def free_disk_gb(self, remote_path: str = ".") -> float: ...

    def close(self) -> None: ...


@dataclass
class FailedStart:
    """An instance a launch created and gave up on: billed from its creation until its destroy
    (destroyed_at None: not confirmed, still billing)."""

    instance_id: Optional[int]
    dph_total: float
    created_at: float
    destroyed_at: Optional[float] = None
    label: str = ""


@dataclass
class Lease:
    """What was rented (or attached), enough to find it again and bill it: plain data, picklable."""

    backend: str  # vast | local | ssh
    label: str
    instance_id: Optional[int] = None
    host: Optional[str] = None
    port: Optional[int] = None
    user: str = "root"
    key_path: Optional[str] = None
    host_key: Optional[str] = None  # "ssh-ed25519 AAAA...": pinned on the first connection, enforced after
    # ["ssh-ed25519 SHA256:..."]: the host keys the provider's second channel (the instance log, read over
    # the HTTPS API) printed; when set, the first connection accepts only a key among them
    host_key_fingerprints: list = field(default_factory=list)
    host_key_source: Optional[str] = None  # which channel pinned host_key: "provider log" | "first use"
    dph_total: float = 0.0
    gpu_name: str = ""
    num_gpus: int = 0
    location: str = ""
    created_at: float = 0.0
    machine_id: Optional[int] = None  # the provider's host (vast): excluded after a failed start
    offer_id: Optional[int] = None
    ssh_alternatives: list = field(default_factory=list)  # [[host, port], ...]: the same machine's other SSH endpoints
    inet_up_cost: float = 0.0  # the host's $/GB for bytes leaving the machine (copies home)
    inet_down_cost: float = 0.0  # the host's $/GB for bytes reaching it (pushes)
    failed_starts: list[FailedStart] = field(default_factory=list)  # what the launch created and gave up on
    run_key_dir: Optional[str] = None  # the per-run key pair's folder (vast), deleted once the machine is gone
    home: Optional[str] = None  # the local backend's folder the steps run in
    gpus_counted: dict = field(default_factory=dict)  # {"nvidia_smi": N, "torch": M}: the setup's GPUS line
