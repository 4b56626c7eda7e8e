"""The `vast` backend: a Vast.ai instance rented through the API (infra/vast.py), reached over SSH."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from contract.machine_config import MachineConfig

from ... import run_estimate
from .. import keys
from ...machines.machine import Lease, LogFn
from ..ssh import SSHBackend, pin_host_key
from .api import VastAPIError, VastProvider


class VastBackend(SSHBackend):
    """Reached like an SSH host (connect, python); rented, billed and destroyed through the API."""

    name = "vast"

    def __init__(self) -> None:
        # Passed to every VastProvider made here (poll_s, retries, backoff_s): tests make polling fast.
        self.provider_options: dict = {}

    def provider(self, api_key: Optional[str], server_url: Optional[str], log: LogFn = print) -> VastProvider:
        return VastProvider(api_key=api_key, server_url=server_url, log_fn=log, **self.provider_options)

    def acquire(self, mc: MachineConfig, label: str, workdir: Path, *, api_key=None, server_url=None,
                log: LogFn = print) -> Lease:
        """Rent the cheapest matching offer; the lease is returned once SSH answers, its host key pinned
        from the fingerprints the instance printed in its log (read over the API before the first
        SSH connection: infra/vast.py), `lease.host_key_source == "provider log"`."""
        # a fresh key pair per rental (label = qat-<installation id>-<flow run id>), never one found in the folder;
        # the lease names its folder (extra["run_key_dir"]) so tasks/rental.py deletes it once the machine is destroyed
        key_dir = Path(workdir) / "ssh" / re.sub(r"[^A-Za-z0-9._-]", "_", label)
        pair = keys.generate_keypair(key_dir)
        lease = self.provider(api_key, server_url, log).launch(
            mc, label, pair.public_key, key_path=str(pair.private_path),
            ready_check=pin_host_key(mc.ssh_timeout_s, log))
        lease.extra["run_key_dir"] = str(key_dir)
        return lease

    def release(self, lease: Lease, *, api_key=None, server_url=None) -> bool:
        """Destroy the instance and confirm it is gone (True). Idempotent."""
        if lease.instance_id is None:
            return True
        return self.provider(api_key, server_url).destroy(int(lease.instance_id))

    def is_alive(self, lease: Lease, *, api_key=None, server_url=None) -> bool:
        return lease.instance_id is not None and self.provider(api_key, server_url).is_running(int(lease.instance_id))

    def find_instances(self, label_prefix: str, *, api_key=None, server_url=None, log: LogFn = print) -> list[Lease]:
        """Our labelled instances; a malformed row is skipped and said through `log`."""
        return [self.lease_from_row(r) for r in self.provider(api_key, server_url, log).find_instances(label_prefix)]

    def price_estimate(self, mc: MachineConfig, *, api_key=None, server_url=None) -> dict:
        """Before renting, on the offer that would be rented (the cheapest run): every step's hours and
        bytes (infra/run_estimate.py), or $/h x machine.planned_hours; and how many offers the market
        filters (CUDA, bandwidth price) left out."""
        provider = self.provider(api_key, server_url)
        best, *rest = provider.search_offers(mc.vast, mc.vast.min_disk_gb)
        est = {"backend": self.name, "dph": float(best["dph_total"]),
               **run_estimate.estimate(best, mc.vast.workload, mc.planned_hours, mc.setup_hours, mc.step_timeout_s),
               "offers": 1 + len(rest), "gpu_name": best.get("gpu_name"), "offer_id": best.get("id"),
               "disk_space": best.get("disk_space")}
        try:
            est["left_out"] = provider.left_out(mc.vast, mc.vast.min_disk_gb)
        except VastAPIError as e:  # only a count for the log: never what refuses a run
            est["left_out"] = {"unknown": str(e)[:200]}
        return est

    def lease_from_row(self, row: dict) -> Lease:
        """created_at 0.0 and dph_total 0.0: unknown (null while the instance is being created)."""
        host, port = VastProvider.ssh_endpoint(row)
        return Lease(backend=self.name, label=str(row.get("label") or ""), instance_id=int(row["id"]), host=host,
                     port=port, dph_total=float(row.get("dph_total") or 0.0), gpu_name=str(row.get("gpu_name") or ""),
                     num_gpus=int(row.get("num_gpus") or 0), created_at=float(row.get("start_date") or 0.0),
                     extra={"machine_id": row.get("machine_id"), "actual_status": row.get("actual_status")})
