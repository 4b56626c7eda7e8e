"""What every backend offers (SkyPilot's sky/provision verbs), as one Protocol.

A backend gets the machine section of the config, never the whole run config, and its own
credentials, never another's: `credentials(secret_block)` reads them (from the environment, or
through `secret_block(name)`, the caller's way to read a stored secret: Prefect Secret blocks for
the flow) and checks them before any request; the other verbs receive what it returned. A backend
that rents nothing needs none (`credentials` returns None and every verb accepts None).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence, runtime_checkable

from contract.machine_config import MachineConfig, TrainWorkload

from ..machines.machine import FailedStart, Lease, LogFn, Machine

SecretBlock = Callable[[str], Optional[str]]  # a stored secret's name -> its value (None: not there)


def no_secret_blocks(name: str) -> Optional[str]:
    """For callers without a secret store (the reaper CLI): credentials come from the environment."""
    return None


class ProviderError(RuntimeError):
    """A backend's provider failed or refused. `retryable`: whether a later try may fix it (tasks/retry.py).
    `failed_starts`: the instances a launch created and gave up on before it failed (billed all the same)."""

    retryable = False
    failed_starts: Sequence[FailedStart] = ()


@runtime_checkable
class Backend(Protocol):
    name: str
    needs_gpu_slot: bool  # holds a slot of the GPU concurrency limit while in use (rented GPUs)
    sets_up_environment: bool  # steps run in a venv setup builds with `python` (else with `python` itself)

    def credentials(self, secret_block: SecretBlock) -> Optional[Any]:
        """This backend's credentials, checked (refused with the fix before any request); None when
        none are configured (a backend that rents nothing needs none)."""

    def secret_values(self, secret_block: SecretBlock) -> list[str]:
        """The secret strings among its credentials, unchecked: for redaction of text that leaves the process."""

    def acquire(self, mc: MachineConfig, label: str, workdir: Path, creds: Any, log: LogFn = print,
                workload: Optional[TrainWorkload] = None) -> Lease:
        """Rent (or attach) a machine, the one on which `workload` (what the run will do) costs least;
        returned once it answers."""

    def connect(self, lease: Lease, timeout: float) -> Machine: ...

    def python(self, mc: MachineConfig) -> str:
        """The interpreter that runs the steps, or (sets_up_environment) the one that builds their venv."""

    def release(self, lease: Lease, creds: Any) -> bool:
        """Destroy what was rented and confirm it is gone (True). Idempotent; hosts we do not own are left alone."""

    def is_alive(self, lease: Lease, creds: Any) -> bool: ...

    def find_instances(self, label_prefix: str, creds: Any, log: LogFn = print) -> list[Lease]:
        """Rented instances whose label starts with label_prefix; a malformed row is skipped and said through `log`."""

    def price_estimate(self, mc: MachineConfig, creds: Any, workload: Optional[TrainWorkload] = None) -> dict:
        """Before renting: what the run would cost on the machine that would be rented (and
        `rented_disk_gb`, the disk it rents, where the backend rents a disk size)."""
