"""The `ssh` backend: a host the user owns, reached over SSH. Nothing is rented or destroyed.

Its host key is trusted on first use (no second channel exists for a host we know only by address)
and kept for later runs in the runs folder's known_hosts (infra/backends/known_hosts.py): the lease records
`host_key_source = "first use"` or `"known_hosts"`, and a changed key is refused, in this run and later ones."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from contract.machine_config import MachineConfig

from . import known_hosts
from ..machines.machine import Lease, LogFn, Machine
from ..machines.ssh import HostKeyChanged, SSHMachine
from .base import SecretBlock


def pin_host_key(timeout: float, log: LogFn):
    """A ready check: SSH answers (retried until `timeout`), the host key gets pinned in the lease.

    Which key is accepted on that first connection: one among `lease.host_key_fingerprints` when a
    second channel gave them (Vast.ai: the instance log over the HTTPS API), else the first key
    seen (trust on first use: an SSH host of the user's offers no other channel). The lease records
    which in `host_key_source` ("provider log" / "first use")."""

    def check(lease: Lease) -> None:
        with SSHMachine(lease, connect_timeout=timeout).connect() as m:
            log(f"ssh {m.name} answers; host key {lease.host_key_source and (lease.host_key or '').split()[0]} "
                f"pinned from {lease.host_key_source}; free disk {m.free_disk_gb('.'):.1f} GB")

    return check


class SSHBackend:
    name = "ssh"
    needs_gpu_slot = False  # a host the user owns: no rented GPU to cap
    sets_up_environment = True  # steps run in a venv setup builds with `python` (machine.python)

    def credentials(self, secret_block: SecretBlock) -> None:
        return None  # the key file named in machine.ssh.key_path is the user's own

    def secret_values(self, secret_block: SecretBlock) -> list[str]:
        return []

    def acquire(self, mc: MachineConfig, label: str, workdir: Path, creds: Any = None, log: LogFn = print,
                workload: Any = None) -> Lease:
        assert mc.ssh is not None  # the config validator guarantees it
        lease = Lease(backend=self.name, label=label, host=mc.ssh.host, port=mc.ssh.port, user=mc.ssh.user,
                      key_path=str(Path(mc.ssh.key_path).expanduser()), created_at=time.time())
        store = known_hosts.default_path()
        lease.host_key = known_hosts.pinned_key(store, lease.host, lease.port)
        lease.host_key_source = "known_hosts" if lease.host_key else None
        try:
            pin_host_key(mc.ssh_timeout_s, log)(lease)
        except HostKeyChanged:
            entry = known_hosts.host_entry(lease.host, lease.port)
            raise HostKeyChanged(
                f"{entry} answered with another host key than the {(lease.host_key or '?').split()[0]} key pinned "
                f"for it in {store} on first contact: refusing to connect (the host was reinstalled, or the "
                f"connection is intercepted). If you trust the host's new key, remove the old one "
                f"(ssh-keygen -R '{entry}' -f {store}) and run again: the next connection pins the key it meets") from None
        if lease.host_key_source == "first use":
            known_hosts.record(store, lease.host, lease.port, lease.host_key or "")
            log(f"ssh {known_hosts.host_entry(lease.host, lease.port)}: host key recorded in {store}")
        return lease

    def connect(self, lease: Lease, timeout: float) -> Machine:
        return SSHMachine(lease, connect_timeout=timeout).connect()

    def python(self, mc: MachineConfig) -> str:
        """The machine's own python (an image's /opt/conda/bin/python3), that builds the venv."""
        return mc.python

    def release(self, lease: Lease, creds: Any = None) -> bool:
        return True  # the host is not ours to destroy

    def is_alive(self, lease: Lease, creds: Any = None) -> bool:
        try:
            SSHMachine(lease, connect_timeout=10).connect().close()
            return True
        except Exception:
            return False

    def find_instances(self, label_prefix: str, creds: Any = None, log: LogFn = print) -> list[Lease]:
        return []

    def price_estimate(self, mc: MachineConfig, creds: Any = None, workload: Any = None) -> dict:
        return {"backend": self.name, "dph": 0.0, "planned_hours": mc.planned_hours, "estimated_usd": 0.0}
