"""Every backend, registered once, and the verbs routed to the one a machine section or lease names
(the Protocol: infra/backends/base.py). Adding a cloud is one folder (or module) under
infra/backends/ and one line in BACKENDS, plus its name in the config's vocabulary
(contract/machine_config.py `Backend`, which refuses a typo before any cost; a test keeps the two equal).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from contract.machine_config import MachineConfig, TrainWorkload

from ..machines.machine import Lease, LogFn, Machine
from .base import Backend
from .local import LocalBackend
from .ssh import SSHBackend
from .vast.backend import VastBackend

BACKENDS: dict[str, Backend] = {b.name: b for b in (VastBackend(), SSHBackend(), LocalBackend())}


def backend(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}: expected one of {sorted(BACKENDS)}") from None


def acquire(mc: MachineConfig, label: str, workdir: Path, creds: Any = None, log: LogFn = print,
            workload: Optional[TrainWorkload] = None) -> Lease:
    """Rent (vast) or attach (ssh, local) a machine; a rented one is returned once SSH answers."""
    return backend(mc.backend).acquire(mc, label, Path(workdir), creds, log=log, workload=workload)


def connect(lease: Lease, timeout: float = 300.0) -> Machine:
    """A connected Machine for the lease (SSH retried until `timeout`; the pinned host key enforced)."""
    return backend(lease.backend).connect(lease, timeout)


def python(lease: Lease, mc: MachineConfig) -> str:
    """Local: the interpreter that runs the steps. SSH, Vast.ai: the machine's own python (the
    image's), which only builds the steps' venv (tasks/rental.py setup_environment)."""
    return backend(lease.backend).python(mc)


def sets_up_environment(lease: Lease) -> bool:
    """Whether steps on this machine run in a venv that setup builds (ssh, vast) rather than with
    `python` itself (local: this very interpreter)."""
    return backend(lease.backend).sets_up_environment


def release(lease: Lease, creds: Any = None) -> bool:
    """Destroy what was rented and confirm it is gone (True). Idempotent; hosts we do not own are left alone."""
    return backend(lease.backend).release(lease, creds)


def is_alive(lease: Lease, creds: Any = None) -> bool:
    """Whether the machine is still there to be used (vast: the instance runs; ssh: it answers)."""
    return backend(lease.backend).is_alive(lease, creds)


def price_estimate(mc: MachineConfig, creds: Any = None, workload: Optional[TrainWorkload] = None) -> dict:
    """Before renting: what the run (`workload`) would cost on the machine that would be rented."""
    return backend(mc.backend).price_estimate(mc, creds, workload=workload)
