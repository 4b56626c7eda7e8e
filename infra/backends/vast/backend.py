"""The `vast` backend: a Vast.ai instance rented through the API (api.py, offers.py, instances.py),
reached over SSH like an SSH host (infra/backends/ssh.py)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from contract.machine_config import MachineConfig, TrainWorkload

from ... import run_estimate
from ...machines.machine import Lease, LogFn, Machine
from .. import keys
from ..base import SecretBlock
from ..ssh import SSHBackend, pin_host_key
from .api import VastAPIError
from .credentials import VastCredentials, read_key, vast_credentials
from .hostkeys import ssh_endpoint
from .instances import VastProvider


class VastBackend:
    """Reached like an SSH host (connect, python); rented, billed and destroyed through the API."""

    name = "vast"
    needs_gpu_slot = True  # a rented GPU: holds a slot of the GPU concurrency limit
    sets_up_environment = True
    _ssh = SSHBackend()

    def credentials(self, secret_block: SecretBlock) -> Optional[VastCredentials]:
        return vast_credentials(secret_block)

    def secret_values(self, secret_block: SecretBlock) -> list[str]:
        key = read_key(secret_block)[0]
        return [key] if key else []

    def provider(self, creds: Optional[VastCredentials], log: LogFn = print) -> VastProvider:
        return VastProvider(api_key=creds.api_key if creds else None, server_url=creds.server_url if creds else None,
                            log_fn=log)

    def acquire(self, mc: MachineConfig, label: str, workdir: Path, creds: Optional[VastCredentials],
                log: LogFn = print, workload: Optional[TrainWorkload] = None) -> Lease:
        """Rent the cheapest matching offer; the lease is returned once SSH answers, its host key pinned
        from the fingerprints the instance printed in its log (read over the API before the first
        SSH connection: hostkeys.py), `lease.host_key_source == "provider log"`."""
        # a fresh key pair per rental (label = qat-<installation id>-<flow run id>), never one found in the folder;
        # the lease names its folder (run_key_dir) so tasks/rental.py deletes it once the machine is destroyed
        key_dir = Path(workdir) / "ssh" / re.sub(r"[^A-Za-z0-9._-]", "_", label)
        pair = keys.generate_keypair(key_dir)
        lease = self.provider(creds, log).launch(mc, label, pair.public_key, key_path=str(pair.private_path),
                                                 ready_check=pin_host_key(mc.ssh_timeout_s, log), workload=workload)
        lease.run_key_dir = str(key_dir)
        return lease

    def connect(self, lease: Lease, timeout: float) -> Machine:
        return self._ssh.connect(lease, timeout)

    def python(self, mc: MachineConfig) -> str:
        return self._ssh.python(mc)

    def release(self, lease: Lease, creds: Optional[VastCredentials]) -> bool:
        """Destroy the instance and confirm it is gone (True). Idempotent."""
        if lease.instance_id is None:
            return True
        return self.provider(creds).destroy(int(lease.instance_id))

    def is_alive(self, lease: Lease, creds: Optional[VastCredentials]) -> bool:
        return lease.instance_id is not None and self.provider(creds).is_running(int(lease.instance_id))

    def find_instances(self, label_prefix: str, creds: Optional[VastCredentials], log: LogFn = print) -> list[Lease]:
        """Our labelled instances; a malformed row is skipped and said through `log`. Without a key
        there is nothing this backend could have rented: none (said through `log`)."""
        if creds is None:
            log("no Vast.ai API key (env VAST_API_KEY or Secret block 'vast-api-key'): no Vast.ai instance to find")
            return []
        return [self.lease_from_row(r) for r in self.provider(creds, log).find_instances(label_prefix)]

    def price_estimate(self, mc: MachineConfig, creds: Optional[VastCredentials],
                       workload: Optional[TrainWorkload] = None) -> dict:
        """Before renting, on the offer that would be rented (the cheapest run): every step's hours and
        bytes (infra/run_estimate.py), or $/h x machine.planned_hours; and how many offers the market
        filters (CUDA, bandwidth price) left out."""
        provider = self.provider(creds)
        best, *rest = provider.search_offers(mc.vast, mc.vast.min_disk_gb, workload=workload)
        est = {"backend": self.name, "dph": float(best["dph_total"]),
               **run_estimate.estimate(best, workload, mc.planned_hours, mc.setup_hours, mc.step_timeout_s),
               "offers": 1 + len(rest), "gpu_name": best.get("gpu_name"), "offer_id": best.get("id"),
               "disk_space": best.get("disk_space"), "rented_disk_gb": mc.vast.min_disk_gb}
        try:
            est["left_out"] = provider.left_out(mc.vast, mc.vast.min_disk_gb)
        except VastAPIError as e:  # only a count for the log: never what refuses a run
            est["left_out"] = {"unknown": str(e)[:200]}
        return est

    def lease_from_row(self, row: dict) -> Lease:
        """created_at 0.0 and dph_total 0.0: unknown (null while the instance is being created)."""
        host, port = ssh_endpoint(row)
        return Lease(backend=self.name, label=str(row.get("label") or ""), instance_id=int(row["id"]), host=host,
                     port=port, dph_total=float(row.get("dph_total") or 0.0), gpu_name=str(row.get("gpu_name") or ""),
                     num_gpus=int(row.get("num_gpus") or 0), created_at=float(row.get("start_date") or 0.0),
                     machine_id=row.get("machine_id"))
