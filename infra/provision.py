"""Each backend (vast, ssh, local) behind the same few functions, like SkyPilot's sky/provision:
acquire -> Lease, connect -> Machine, release (idempotent, confirmed), find_instances,
is_alive, estimate_cost."""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Callable, Optional

from steps.config import RunConfig

from . import keys
from .local import LocalMachine
from .machine import Lease, Machine
from .ssh import SSHMachine
from .vast import VastProvider

LogFn = Callable[[str], None]
# Passed to every VastProvider made here (poll_s, retries, backoff_s): tests make polling fast.
PROVIDER_OPTIONS: dict = {}


def _provider(api_key: Optional[str], server_url: Optional[str], log: LogFn = print) -> VastProvider:
    return VastProvider(api_key=api_key, server_url=server_url, log_fn=log, **PROVIDER_OPTIONS)


def _pin_host_key(timeout: float, log: LogFn) -> Callable[[Lease], None]:
    """A ready check: SSH answers (retried until `timeout`), the host key gets pinned in the lease."""

    def check(lease: Lease) -> None:
        with SSHMachine(lease, connect_timeout=timeout).connect() as m:
            log(f"ssh {m.name} answers; free disk {m.free_disk_gb('.'):.1f} GB")

    return check


def acquire(cfg: RunConfig, label: str, workdir: Path, api_key: Optional[str] = None,
            server_url: Optional[str] = None, log: LogFn = print) -> Lease:
    """Rent (vast) or attach (ssh, local) a machine. For vast, the lease is returned only once SSH
    answers; its host key is pinned in the lease."""
    mc = cfg.machine
    workdir = Path(workdir)
    if mc.backend == "local":
        home = workdir / "machine"
        home.mkdir(parents=True, exist_ok=True)
        return Lease(backend="local", label=label, host="localhost", created_at=time.time(),
                     extra={"home": str(home.resolve())})
    if mc.backend == "ssh":
        assert mc.ssh is not None  # the config validator guarantees it
        lease = Lease(backend="ssh", label=label, host=mc.ssh.host, port=mc.ssh.port, user=mc.ssh.user,
                      key_path=str(Path(mc.ssh.key_path).expanduser()), created_at=time.time())
        _pin_host_key(mc.ssh_timeout_s, log)(lease)
        return lease
    # one key pair per run (label = qat-<flow run id>), reused if the run rents again
    pair = keys.load_or_generate(workdir / "ssh" / re.sub(r"[^A-Za-z0-9._-]", "_", label))
    provider = _provider(api_key, server_url, log)
    return provider.launch(cfg, label, pair.public_key, key_path=str(pair.private_path),
                           ready_check=_pin_host_key(mc.ssh_timeout_s, log))


def connect(lease: Lease, timeout: float = 300.0) -> Machine:
    """A connected Machine for the lease (SSH retried until `timeout`; the pinned host key enforced)."""
    if lease.backend == "local":
        return LocalMachine(Path(lease.extra["home"]), name=f"local:{lease.label}")
    if lease.backend in ("vast", "ssh"):
        return SSHMachine(lease, connect_timeout=timeout).connect()
    raise ValueError(f"unknown backend {lease.backend!r}: expected vast, ssh or local")


def release(lease: Lease, api_key: Optional[str] = None, server_url: Optional[str] = None) -> bool:
    """Destroy a rented instance and confirm it is gone (True). Idempotent; nothing to do for
    local and ssh hosts (they are not ours to destroy)."""
    if lease.backend != "vast" or lease.instance_id is None:
        return True
    return _provider(api_key, server_url).destroy(int(lease.instance_id))


def is_alive(lease: Lease, api_key: Optional[str] = None, server_url: Optional[str] = None) -> bool:
    """Whether the machine is still there to be used (vast: the instance runs; ssh: it answers)."""
    if lease.backend == "local":
        return True
    if lease.backend == "ssh":
        try:
            SSHMachine(lease, connect_timeout=10).connect().close()
            return True
        except Exception:
            return False
    return lease.instance_id is not None and _provider(api_key, server_url).is_running(int(lease.instance_id))


def lease_from_instance(row: dict) -> Lease:
    host, port = VastProvider.ssh_endpoint(row)
    return Lease(backend="vast", label=str(row.get("label") or ""), instance_id=int(row["id"]), host=host, port=port,
                 dph_total=float(row.get("dph_total") or 0.0), gpu_name=str(row.get("gpu_name") or ""),
                 num_gpus=int(row.get("num_gpus") or 0), created_at=float(row.get("start_date") or 0.0),
                 extra={"machine_id": row.get("machine_id"), "actual_status": row.get("actual_status")})


def find_instances(label_prefix: str, api_key: Optional[str] = None, server_url: Optional[str] = None) -> list[Lease]:
    """Our Vast.ai instances whose label starts with label_prefix, as Leases (for teardown)."""
    return [lease_from_instance(r) for r in _provider(api_key, server_url).find_instances(label_prefix)]


def estimate_cost(cfg: RunConfig, api_key: Optional[str] = None, server_url: Optional[str] = None) -> dict:
    """Before renting: the cheapest matching offer's $/h times machine.planned_hours."""
    mc = cfg.machine
    if mc.backend != "vast":
        return {"backend": mc.backend, "dph": 0.0, "planned_hours": mc.planned_hours, "estimated_usd": 0.0}
    offers = _provider(api_key, server_url).search_offers(mc.vast, mc.vast.min_disk_gb)
    best = offers[0]
    dph = float(best["dph_total"])
    return {"backend": "vast", "dph": dph, "planned_hours": mc.planned_hours,
            "estimated_usd": round(dph * mc.planned_hours, 4), "offers": len(offers),
            "gpu_name": best.get("gpu_name"), "offer_id": best.get("id")}
