"""The `local` backend: steps run on this machine, in a folder of the run directory (demo, tests)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from contract.machine_config import MachineConfig

from ..machines.local import LocalMachine
from ..machines.machine import Lease, LogFn, Machine


class LocalBackend:
    name = "local"
    sets_up_environment = False  # steps run with this interpreter: nothing to install

    def acquire(self, mc: MachineConfig, label: str, workdir: Path, *, api_key=None, server_url=None,
                log: LogFn = print) -> Lease:
        home = Path(workdir) / "machine"
        home.mkdir(parents=True, exist_ok=True)
        return Lease(backend=self.name, label=label, host="localhost", created_at=time.time(),
                     extra={"home": str(home.resolve())})

    def connect(self, lease: Lease, timeout: float) -> Machine:
        return LocalMachine(Path(lease.extra["home"]), name=f"local:{lease.label}")

    def python(self, mc: MachineConfig) -> str:
        return sys.executable  # this very interpreter: the steps need no other

    def release(self, lease: Lease, *, api_key=None, server_url=None) -> bool:
        return True  # nothing was rented

    def is_alive(self, lease: Lease, *, api_key=None, server_url=None) -> bool:
        return True

    def find_instances(self, label_prefix: str, *, api_key=None, server_url=None, log=print) -> list[Lease]:
        return []

    def price_estimate(self, mc: MachineConfig, *, api_key=None, server_url=None) -> dict:
        return {"backend": self.name, "dph": 0.0, "planned_hours": mc.planned_hours, "estimated_usd": 0.0}
