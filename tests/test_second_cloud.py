"""A second cloud is one backend plus one registry line (infra/backends/registry.py BACKENDS).

`PocketCloud`, registered only in these tests, rents "instances" kept in a dict and accepts only its
own token (env POCKETCLOUD_TOKEN). With no Vast.ai key anywhere, the flow's crash/cancel hook
(tasks/teardown.py) and the reap flow's pass (tasks/reaping.py) find and destroy its labelled
machines, each call carrying the token the backend read for itself."""
from __future__ import annotations

import inspect
import os
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import pytest

from contract.config import load_config
from contract.machine_config import MachineConfig, TrainWorkload
from infra.backends import registry
from infra.backends.base import Backend, ProviderError, SecretBlock
from infra.machines.local import LocalMachine
from infra.machines.machine import Lease, LogFn, Machine
from prefect_api import prefect_api
from tasks import labels, secrets

TOKEN = "pocket-" + uuid.uuid4().hex


class PocketCloud:
    name = "pocketcloud"
    needs_gpu_slot = True
    sets_up_environment = False

    def __init__(self, root: Path):
        self.root, self.instances, self.released = root, {}, []

    def credentials(self, secret_block: SecretBlock) -> Optional[dict]:
        token = os.environ.get("POCKETCLOUD_TOKEN") or secret_block("pocketcloud-token")
        return {"token": token} if token else None

    def secret_values(self, secret_block: SecretBlock) -> list[str]:
        creds = self.credentials(secret_block)
        return [creds["token"]] if creds else []

    def _signed_in(self, creds: Any) -> None:
        if creds != {"token": TOKEN}:
            raise ProviderError("pocketcloud: no or wrong token (set POCKETCLOUD_TOKEN)")

    def acquire(self, mc: MachineConfig, label: str, workdir: Path, creds: Any, log: LogFn = print,
                workload: Optional[TrainWorkload] = None) -> Lease:
        self._signed_in(creds)
        iid = 100 + len(self.instances) + len(self.released)
        (self.root / str(iid)).mkdir(parents=True)
        lease = Lease(backend=self.name, label=label, instance_id=iid, host="pocket", created_at=time.time())
        self.instances[iid] = lease
        return lease

    def connect(self, lease: Lease, timeout: float) -> Machine:
        return LocalMachine(self.root / str(lease.instance_id), name=f"pocket:{lease.instance_id}")

    def python(self, mc: MachineConfig) -> str:
        return sys.executable

    def release(self, lease: Lease, creds: Any) -> bool:
        self._signed_in(creds)
        if self.instances.pop(lease.instance_id, None) is not None:
            self.released.append(lease.instance_id)
        return True

    def is_alive(self, lease: Lease, creds: Any) -> bool:
        self._signed_in(creds)
        return lease.instance_id in self.instances

    def find_instances(self, label_prefix: str, creds: Any, log: LogFn = print) -> list[Lease]:
        if creds is None:
            return []  # no token: nothing of ours could have been rented here
        self._signed_in(creds)
        return [lease for lease in self.instances.values() if lease.label.startswith(label_prefix)]

    def price_estimate(self, mc: MachineConfig, creds: Any, workload: Optional[TrainWorkload] = None) -> dict:
        self._signed_in(creds)
        return {"backend": self.name, "dph": 0.0, "planned_hours": mc.planned_hours, "estimated_usd": 0.0}


@pytest.fixture
def pocket(tmp_path, monkeypatch):
    """PocketCloud registered, its token in the environment, no Vast.ai key, and a Prefect API that
    answers nothing (refused at once): no Secret block, no installation id, no run to ask about."""
    from devtools.emulator.sshd import free_port

    cloud = PocketCloud(tmp_path / "pocket")
    monkeypatch.setitem(registry.BACKENDS, cloud.name, cloud)
    monkeypatch.setenv("POCKETCLOUD_TOKEN", TOKEN)
    monkeypatch.delenv("VAST_API_KEY", raising=False)
    monkeypatch.delenv("VAST_URL", raising=False)
    monkeypatch.setenv("QAT_REAPER_STATE", str(tmp_path / "reaper-state.json"))
    labels._cache.clear()
    with prefect_api(f"http://127.0.0.1:{free_port()}/api", PREFECT_CLIENT_MAX_RETRIES=0):
        yield cloud
    labels._cache.clear()


def _rent(cloud: PocketCloud, label: str, tmp_path: Path) -> Lease:
    mc = load_config("tiny").machine
    return registry.backend(cloud.name).acquire(mc, label, tmp_path, secrets.credentials(cloud.name))


def test_the_test_cloud_is_a_backend_and_keeps_its_token_out_of_logs(pocket):
    assert isinstance(pocket, Backend)
    assert secrets.credentials("pocketcloud") == {"token": TOKEN}
    assert secrets.redact(f"boom {TOKEN}") == "boom ***"


def _verbs(cls) -> dict[str, list[tuple]]:
    """The Protocol's verbs as `cls` defines them: (name, kind, has a default) of each parameter."""
    protocol_verbs = [n for n, v in vars(Backend).items() if inspect.isfunction(v) and not n.startswith("_")]
    return {verb: [(p.name, p.kind, p.default is not p.empty)
                   for p in inspect.signature(getattr(cls, verb)).parameters.values()]
            for verb in protocol_verbs}


@pytest.mark.parametrize("cls", [type(b) for b in registry.BACKENDS.values()] + [PocketCloud],
                         ids=lambda cls: cls.__name__)
def test_every_backend_takes_the_protocols_parameters(cls):
    """The registry calls verbs by keyword (acquire(..., log=, workload=), price_estimate(..., workload=)):
    each backend's verbs take the Protocol's parameters, same names, order and kinds; where the
    Protocol has a default so does the backend (it may add defaults: those calls still work)."""
    want, got = _verbs(Backend), _verbs(cls)
    assert set(want) == {"credentials", "secret_values", "acquire", "connect", "python", "release", "is_alive",
                         "find_instances", "price_estimate"}
    for verb, params in want.items():
        assert [p[:2] for p in got[verb]] == [p[:2] for p in params], f"{cls.__name__}.{verb}"
        assert all(has for (_, _, needs), (_, _, has) in zip(params, got[verb]) if needs), f"{cls.__name__}.{verb}"


def test_the_crash_hook_destroys_this_runs_machine_on_the_second_cloud(pocket, tmp_path):
    from tasks.teardown import destroy_by_label

    run_id, other_run = uuid.uuid4(), uuid.uuid4()
    mine = _rent(pocket, labels.make_label("0badc0de", run_id), tmp_path)
    other = _rent(pocket, labels.make_label("0badc0de", other_run), tmp_path)
    destroy_by_label(None, SimpleNamespace(id=run_id), SimpleNamespace(name="Crashed"))
    assert pocket.released == [mine.instance_id]
    assert list(pocket.instances) == [other.instance_id]


def test_the_reap_flow_destroys_an_old_machine_on_the_second_cloud(pocket, tmp_path):
    from tasks.reaping import reap_labelled

    old = _rent(pocket, labels.make_label("0badc0de", uuid.uuid4()), tmp_path)
    old.created_at = time.time() - 3 * 3600
    young = _rent(pocket, labels.make_label("0badc0de", uuid.uuid4()), tmp_path)
    said: list[str] = []
    rows = reap_labelled(2.0, False, said.append)
    assert [(r["instance_id"], r["destroyed"]) for r in rows] == [(old.instance_id, True)], said
    assert pocket.released == [old.instance_id] and list(pocket.instances) == [young.instance_id]
