"""Every backend behind the same verbs, registered once (SkyPilot's sky/provision routing):

    acquire -> Lease, connect -> Machine, python (local: the interpreter steps run with; ssh, vast:
    the machine's python that builds the workload's venv, `sets_up_environment`), release
    (idempotent, confirmed), is_alive, find_instances (rented instances by label prefix), price_estimate

A backend gets the machine section of the config, never the whole run config. Adding a cloud is
one module with these verbs and one line in BACKENDS.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from contract.machine_config import MachineConfig

from .local import LocalBackend
from ..machines.machine import Lease, LogFn, Machine
from .ssh import SSHBackend
from .vast.backend import VastBackend

BACKENDS = {b.name: b for b in (VastBackend(), SSHBackend(), LocalBackend())}


def backend(name: str):
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}: expected one of {sorted(BACKENDS)}") from None


def acquire(mc: MachineConfig, label: str, workdir: Path, api_key: Optional[str] = None,
            server_url: Optional[str] = None, log: LogFn = print) -> Lease:
    """Rent (vast) or attach (ssh, local) a machine; a rented one is returned once SSH answers."""
    return backend(mc.backend).acquire(mc, label, Path(workdir), api_key=api_key, server_url=server_url, log=log)


def connect(lease: Lease, timeout: float = 300.0) -> Machine:
    """A connected Machine for the lease (SSH retried until `timeout`; the pinned host key enforced)."""
    return backend(lease.backend).connect(lease, timeout)


def python(lease: Lease, mc: MachineConfig) -> str:
    """Local: the interpreter that runs the steps. SSH, Vast.ai: the machine's own python (the
    image's), which only builds the workload's venv (tasks/rental.py setup_environment)."""
    return backend(lease.backend).python(mc)


def sets_up_environment(lease: Lease) -> bool:
    """Whether steps on this machine run in a venv that setup builds (ssh, vast) rather than with
    `python` itself (local: this very interpreter)."""
    return backend(lease.backend).sets_up_environment


def release(lease: Lease, api_key: Optional[str] = None, server_url: Optional[str] = None) -> bool:
    """Destroy what was rented and confirm it is gone (True). Idempotent; hosts we do not own are left alone."""
    return backend(lease.backend).release(lease, api_key=api_key, server_url=server_url)


def is_alive(lease: Lease, api_key: Optional[str] = None, server_url: Optional[str] = None) -> bool:
    """Whether the machine is still there to be used (vast: the instance runs; ssh: it answers)."""
    return backend(lease.backend).is_alive(lease, api_key=api_key, server_url=server_url)


def find_instances(label_prefix: str, api_key: Optional[str] = None, server_url: Optional[str] = None,
                   log: LogFn = print) -> list[Lease]:
    """Rented instances, on every backend, whose label starts with label_prefix (for teardown); a
    malformed row is skipped and said through `log`."""
    return [lease for b in BACKENDS.values()
            for lease in b.find_instances(label_prefix, api_key=api_key, server_url=server_url, log=log)]


def price_estimate(mc: MachineConfig, api_key: Optional[str] = None, server_url: Optional[str] = None) -> dict:
    """Before renting: what the machine would cost for machine.planned_hours."""
    return backend(mc.backend).price_estimate(mc, api_key=api_key, server_url=server_url)
