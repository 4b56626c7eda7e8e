"""The `local` backend: steps run on this machine, in a folder of the run directory (demo, tests)."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from contract.machine_config import MachineConfig

from ..machines.local import LocalMachine
from ..machines.machine import Lease, LogFn, Machine
from .base import SecretBlock


class LocalBackend:
    name = "local"
    needs_gpu_slot = False  # nothing rented
    sets_up_environment = False  # steps run with this interpreter: nothing to install

    def credentials(self, secret_block: SecretBlock) -> None:
        return None  # nothing to rent, nothing to sign in to

    def secret_values(self, secret_block: SecretBlock) -> list[str]:
        return []

    def acquire(self, mc: MachineConfig, label: str, workdir: Path, creds: Any = None, log: LogFn = print,
                workload: Any = None) -> Lease:
        home = Path(workdir) / "machine"
        home.mkdir(parents=True, exist_ok=True)
        return Lease(backend=self.name, label=label, host="localhost", created_at=time.time(),
                     home=str(home.resolve()))

    def connect(self, lease: Lease, timeout: float) -> Machine:
        return LocalMachine(Path(lease.home or "."), name=f"local:{lease.label}")

    def python(self, mc: MachineConfig) -> str:
        return sys.executable  # this very interpreter: the steps need no other

    def release(self, lease: Lease, creds: Any = None) -> bool:
        return True  # nothing was rented

    def is_alive(self, lease: Lease, creds: Any = None) -> bool:
        return True

    def find_instances(self, label_prefix: str, creds: Any = None, log: LogFn = print) -> list[Lease]:
        return []

    def price_estimate(self, mc: MachineConfig, creds: Any = None, workload: Any = None) -> dict:
        return {"backend": self.name, "dph": 0.0, "planned_hours": mc.planned_hours, "estimated_usd": 0.0}
