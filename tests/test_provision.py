"""acquire / connect / release / find_instances / price_estimate per backend, and the reaper."""
import os
import subprocess
import sys
import time

import pytest

from infra.backends.vast.credentials import VastCredentials
from infra import reaper
from infra.backends import registry as provision
from infra.machines.machine import Lease
from infra.machines.ssh import SSHMachine
from contract.config import load_config
from contract.layout import REPO_ROOT


pytestmark = pytest.mark.usefixtures("fast_polling")


def cfg(**overrides):
    return load_config("tiny", {"machine.provision_timeout_s": 20, "machine.ssh_timeout_s": 20, **overrides})


def test_vast_acquire_connect_release(emulator, tmp_path):
    c = cfg()
    est = provision.price_estimate(c.machine, VastCredentials(emulator.api_key, emulator.url))
    assert est["dph"] > 0 and est["estimated_usd"] == pytest.approx(est["dph"] * c.machine.planned_hours, abs=1e-4)
    # the ssh key arrives 1.5 s after the instance runs: acquire keeps trying until it answers
    emulator.set_faults(ssh_refuse_s=1.5)
    lease = provision.acquire(c.machine, "qat-run1", tmp_path, VastCredentials(emulator.api_key, emulator.url),
                              log=lambda m: None)
    key = tmp_path / "ssh" / "qat-run1" / "id_ed25519"
    assert oct(key.stat().st_mode & 0o777) == "0o600" and lease.key_path == str(key)
    info = emulator.instance_info(lease.instance_id)
    assert lease.host_key == info["host_key"]  # pinned while acquiring
    assert est["dph"] == pytest.approx(lease.dph_total)
    m = provision.connect(lease, timeout=10)
    lines = []
    m.run(["sh", "-c", "echo $VAST_EMULATED"], on_line=lines.append)
    assert lines == ["1"]
    m.close()
    assert provision.is_alive(lease, VastCredentials(emulator.api_key, emulator.url))
    found = provision.backend("vast").find_instances("qat-", VastCredentials(emulator.api_key, emulator.url))
    assert [(f.label, f.instance_id) for f in found] == [("qat-run1", lease.instance_id)]
    assert found[0].created_at > 0 and found[0].port == lease.port
    assert provision.release(lease, VastCredentials(emulator.api_key, emulator.url)) is True
    assert provision.release(lease, VastCredentials(emulator.api_key, emulator.url)) is True  # idempotent
    assert not provision.is_alive(lease, VastCredentials(emulator.api_key, emulator.url))
    assert emulator.live_instances() == []


def test_local_backend(tmp_path):
    c = cfg(**{"machine.backend": "local"})
    assert provision.price_estimate(c.machine)["estimated_usd"] == 0
    lease = provision.acquire(c.machine, "qat-local", tmp_path)
    m = provision.connect(lease)
    m.write_text("qat/run.yaml", c.to_yaml())
    assert (tmp_path / "machine" / "qat" / "run.yaml").is_file()
    assert provision.release(lease) is True and provision.is_alive(lease)


def test_ssh_backend_pins_host_key(sshd_host, tmp_path, monkeypatch):
    monkeypatch.setenv("QAT_RUNS_DIR", str(tmp_path / "runs"))
    c = cfg(**{"machine.backend": "ssh", "machine.ssh": {"host": sshd_host.host, "port": sshd_host.port,
                                                         "user": sshd_host.user, "key_path": str(sshd_host.key_path)}})
    lease = provision.acquire(c.machine, "qat-ssh", tmp_path, log=lambda m: None)
    assert lease.host_key == sshd_host.host_key
    assert isinstance(provision.connect(lease, timeout=5), SSHMachine)
    assert provision.release(lease) is True  # not ours to destroy: a no-op
    assert sshd_host.sshd.alive()


def _create(emulator, label: str) -> int:
    from infra.backends.vast.instances import VastProvider

    p = VastProvider(api_key=emulator.api_key, server_url=emulator.url)
    offer = p._sdk.search_offers(query={"rented": {"eq": False}, "disk_space": {"gte": 10}}, no_default=True)[0]
    return p._sdk.create_instance(offer["id"], image="x", disk=10, label=label)["new_contract"]


def test_reaper_age_and_finished_runs(emulator):
    emulator.set_faults(half_filled_s=0)  # rows with a start date at once (tests/test_rows.py: without)
    old, finished, active, foreign = (_create(emulator, lbl) for lbl in ("qat-old", "qat-done", "qat-live", "mine"))
    kw = dict(credentials={"vast": VastCredentials(emulator.api_key, emulator.url)}, log=lambda m: None)
    status = lambda label: reaper.GONE if label == "qat-done" else reaper.ACTIVE  # noqa: E731
    suspects: dict = {}
    # one "gone" verdict is not enough: remembered, nothing destroyed
    assert reaper.reap_instances(max_age_hours=1, run_status=status, suspects=suspects, **kw) == []
    assert suspects == {"qat-done": 1} and len(emulator.live_instances()) == 4
    rows = reaper.reap_instances(max_age_hours=1, run_status=status, suspects=dict(suspects), dry_run=True, **kw)
    assert [r["instance_id"] for r in rows] == [finished] and len(emulator.live_instances()) == 4
    later = time.time() + 2 * 3600
    rows = reaper.reap_instances(max_age_hours=1, now=later, run_status=lambda label: reaper.ACTIVE, **kw)
    assert sorted(r["instance_id"] for r in rows) == sorted([old, finished, active])
    assert all(r["destroyed"] and r["reason"] == "older than 1 h" for r in rows)
    assert [r["id"] for r in emulator.live_instances()] == [foreign]  # other labels are never touched
    provision.release(Lease(backend="vast", label="mine", instance_id=foreign), VastCredentials(emulator.api_key, emulator.url))


def test_reaper_keeps_on_unknown_and_errors_and_resets_the_count(emulator):
    iid = _create(emulator, "qat-x")
    kw = dict(credentials={"vast": VastCredentials(emulator.api_key, emulator.url)}, log=lambda m: None, max_age_hours=1)

    def boom(label):
        raise TimeoutError("the API timed out")

    for verdicts in ([reaper.GONE, reaper.UNKNOWN, reaper.GONE], [reaper.GONE, boom, reaper.GONE],
                     [reaper.GONE, reaper.ACTIVE, reaper.GONE]):
        suspects: dict = {}
        for v in verdicts:
            rows = reaper.reap_instances(run_status=v if callable(v) else (lambda label, v=v: v), suspects=suspects, **kw)
            assert rows == [] and [r["id"] for r in emulator.live_instances()] == [iid], verdicts
    rows = reaper.reap_instances(run_status=lambda label: reaper.GONE, suspects=suspects, **kw)
    assert [r["instance_id"] for r in rows] == [iid] and rows[0]["destroyed"] and suspects == {}


def test_reaper_cli(emulator, monkeypatch, capsys):
    emulator.set_faults(half_filled_s=0)  # a row with a start date at once (tests/test_rows.py: without)
    _create(emulator, "qat-cli")
    monkeypatch.setenv("VAST_API_KEY", emulator.api_key)
    assert reaper.main(["--url", emulator.url, "--max-age-hours", "0", "--dry-run"]) == 0
    assert "would destroy" in capsys.readouterr().out and len(emulator.live_instances()) == 1
    r = subprocess.run([sys.executable, "-m", "infra.reaper", "--url", emulator.url, "--max-age-hours", "0"],
                       cwd=REPO_ROOT, env={**os.environ, "VAST_API_KEY": emulator.api_key},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "1 instance(s) reaped" in r.stdout, r.stdout + r.stderr
    assert emulator.live_instances() == [] and emulator.api_key not in r.stdout + r.stderr
    monkeypatch.setenv("VAST_API_KEY", "wrong-key-999")
    assert reaper.main(["--url", emulator.url, "--max-age-hours", "1"]) == 2
    err = capsys.readouterr().err
    assert "HTTP 401" in err and "wrong-key-999" not in err


def test_vast_acquire_makes_a_fresh_private_key_pair_whatever_the_umask(emulator, tmp_path):
    """A pair already in the run's key folder (planted, or left by an earlier rental) is replaced, and
    under umask 000 the folder is still 0700 and both files 0600 (issue 19, finding 17)."""
    from infra.backends import keys

    planted = keys.generate_keypair(tmp_path / "ssh" / "qat-run2")
    old = os.umask(0)
    try:
        lease = provision.acquire(cfg().machine, "qat-run2", tmp_path, VastCredentials(emulator.api_key, emulator.url), log=lambda m: None)
    finally:
        os.umask(old)
    try:
        folder = tmp_path / "ssh" / "qat-run2"
        pub = (folder / "id_ed25519.pub").read_text().strip()
        assert pub != planted.public_key and lease.key_path == str(folder / "id_ed25519")
        assert oct(folder.stat().st_mode & 0o777) == "0o700"
        assert {p.name: oct(p.stat().st_mode & 0o777) for p in folder.iterdir()} == {
            "id_ed25519": "0o600", "id_ed25519.pub": "0o600"}
    finally:
        provision.release(lease, VastCredentials(emulator.api_key, emulator.url))


def test_ssh_backend_keeps_the_host_key_for_later_runs_and_refuses_a_changed_one(sshd_host, tmp_path, monkeypatch):
    """First contact records host:port's key in the runs folder's known_hosts; a later run accepts that
    key only, and a changed key is refused, saying how to accept it (issue 19, finding 9)."""
    from infra.backends import keys
    from infra.machines.ssh import HostKeyChanged

    monkeypatch.setenv("QAT_RUNS_DIR", str(tmp_path / "runs"))
    store = tmp_path / "runs" / "known_hosts"
    c = cfg(**{"machine.backend": "ssh", "machine.ssh": {"host": sshd_host.host, "port": sshd_host.port,
                                                         "user": sshd_host.user, "key_path": str(sshd_host.key_path)}})
    first = provision.acquire(c.machine, "qat-run-1", tmp_path / "runs" / "tiny" / "r1", log=lambda m: None)
    assert first.host_key_source == "first use"
    assert store.read_text() == f"[{sshd_host.host}]:{sshd_host.port} {sshd_host.host_key}\n"
    assert oct(store.stat().st_mode & 0o777) == "0o600"
    second = provision.acquire(c.machine, "qat-run-2", tmp_path / "runs" / "tiny" / "r2", log=lambda m: None)
    assert (second.host_key, second.host_key_source) == (sshd_host.host_key, "known_hosts")
    # the host now shows another key than the one pinned (here: the pin replaced, same effect)
    other = keys.generate_keypair(tmp_path / "other").public_key.rsplit(" ", 1)[0]
    store.write_text(f"[{sshd_host.host}]:{sshd_host.port} {other}\n")
    with pytest.raises(HostKeyChanged, match=r"known_hosts on first contact: refusing.*ssh-keygen -R"):
        provision.acquire(c.machine, "qat-run-3", tmp_path / "runs" / "tiny" / "r3", log=lambda m: None)
    assert store.read_text() == f"[{sshd_host.host}]:{sshd_host.port} {other}\n"  # nothing re-pinned
