"""SSHMachine against a real sshd on loopback (fixture `sshd_host`)."""
import logging
import threading
import time

import pytest

from file_trees import NASTY, make_tree, run_streamed
from infra.backends import keys
from infra.machines.machine import CommandFailed, CommandTimeout, Lease, TransientMachineError
from infra.machines.ssh import HostKeyChanged, SSHMachine


def lease_for(h, **kw) -> Lease:
    return Lease(backend="ssh", label="t", host=h.host, port=h.port, user=h.user, key_path=str(h.key_path), **kw)


@pytest.fixture
def machine(sshd_host):
    m = SSHMachine(lease_for(sshd_host), connect_timeout=20).connect()
    yield m
    m.close()


def test_pins_host_key_and_refuses_a_changed_one(sshd_host, tmp_path, caplog):
    lease = lease_for(sshd_host)
    SSHMachine(lease, connect_timeout=10).connect().close()
    assert lease.host_key == sshd_host.host_key
    SSHMachine(lease, connect_timeout=10).connect().close()  # same key: fine
    other = keys.generate_keypair(tmp_path).public_key.rsplit(" ", 1)[0]
    lease.host_key = other
    caplog.set_level(logging.DEBUG, logger="qat.machine")
    with pytest.raises(HostKeyChanged, match="pinned"):
        SSHMachine(lease, connect_timeout=30).connect()
    assert "retrying" not in caplog.text  # refused at once, not retried until the deadline


def test_generated_key_pair_logs_in(sshd_host, tmp_path):
    pair = keys.generate_keypair(tmp_path / "run" / "ssh")
    assert oct(pair.private_path.stat().st_mode & 0o777) == "0o600"
    assert pair.public_key.startswith("ssh-ed25519 AAAA") and "PRIVATE" not in repr(pair)
    assert keys.generate_keypair(tmp_path / "run" / "ssh").public_key != pair.public_key  # never reused
    pair = keys.generate_keypair(tmp_path / "run" / "ssh")
    sshd_host.sshd.authorize(pair.public_key)
    lease = Lease(backend="ssh", label="k", host=sshd_host.host, port=sshd_host.port, key_path=str(pair.private_path))
    with SSHMachine(lease, connect_timeout=10).connect() as m:
        assert m.run(["true"]) == 0


def test_run_streams_quotes_and_masks(machine, sshd_host, caplog):
    caplog.set_level(logging.DEBUG, logger="qat.machine")
    machine.run(["mkdir", "-p", f"dir {NASTY}"])
    code, seen = run_streamed(machine, sshd_host.home / "go", f"dir {NASTY}", {"V": NASTY, "TOKEN": "hf_supersecret123"})
    assert code == 5
    assert seen == ["one", "two", NASTY, str(sshd_host.home / f"dir {NASTY}")]
    assert not list(sshd_host.home.rglob("pwned*"))
    assert "hf_supersecret123" not in caplog.text and "TOKEN='***'" in caplog.text
    out = []
    machine.run(["sh", "-c", 'echo "$TOKEN"; tr "\\0" " " < /proc/$PPID/cmdline; echo'], env={"TOKEN": "hf_s3cr3t"},
                on_line=out.append)
    assert out[0] == "hf_s3cr3t" and "hf_s3cr3t" not in out[1]  # the value is not in the shell's command line


def test_failure_tail_and_timeout(machine, sshd_host):
    with pytest.raises(CommandFailed) as e:
        machine.run(["sh", "-c", "for i in $(seq 1 100); do echo line$i; done; echo oops >&2; exit 7"],
                    env={"KEY": "hunter2hunter2"})
    assert e.value.exit_code == 7 and e.value.tail.splitlines()[-2:] == ["line100", "oops"]
    assert "hunter2hunter2" not in str(e.value) and "__QAT_PID__" not in str(e.value)
    with pytest.raises(CommandTimeout):
        machine.run(["sh", "-c", "echo started; sleep 2 && touch survived"], timeout=0.5)
    time.sleep(2)
    assert not (sshd_host.home / "survived").exists()  # stopped at its timeout: its process group was killed
    assert machine.run(["true"]) == 0  # the connection is still usable


def test_put_get_exists_df(machine, sshd_host, tmp_path):
    src = make_tree(tmp_path / "repo", git=True)
    machine.put(src, "qat/code", include=["pkg", "top.txt", "absent"])
    remote = sshd_host.home / "qat" / "code"
    assert sorted(str(p.relative_to(remote)) for p in remote.rglob("*") if p.is_file()) == \
        ["pkg/a.py", "pkg/sub/b.txt", "top.txt"]
    assert not list(sshd_host.home.glob(".qat-upload-*"))  # the tarball was removed
    machine.put(src, "qat/raw", include=["pkg"], respect_gitignore=False)
    assert (sshd_host.home / "qat/raw/pkg/big.bin").exists()
    machine.write_text("qat/run.yaml", "name: x\n")
    assert machine.exists("qat/run.yaml") and not machine.exists("qat/nothing here")
    machine.get("qat/code/pkg", tmp_path / "back")
    assert sorted(str(p.relative_to(tmp_path / "back")) for p in (tmp_path / "back").rglob("*") if p.is_file()) == \
        ["a.py", "sub/b.txt"]
    machine.get("qat/run.yaml", tmp_path / "r" / "run.yaml")
    assert (tmp_path / "r" / "run.yaml").read_text() == "name: x\n"
    assert machine.free_disk_gb() > 0 and machine.free_disk_gb("qat/not/yet") > 0


def test_reconnects_after_drop_and_run_raises_transient(machine, sshd_host):
    assert machine.exists(".")
    result = {}

    def long_run():
        try:
            machine.run(["sleep", "20"])
        except Exception as e:
            result["exc"] = e

    t = threading.Thread(target=long_run)
    t.start()
    time.sleep(0.5)
    sshd_host.stop()  # the machine goes away: sessions die, the connection drops
    t.join(timeout=15)
    assert isinstance(result.get("exc"), TransientMachineError)
    sshd_host.start()
    assert machine.exists(".")  # idempotent operations reconnect
    machine.write_text("after-drop.txt", "ok")
    assert (sshd_host.home / "after-drop.txt").read_text() == "ok"


def test_falls_back_to_the_other_endpoint(sshd_host):
    from devtools.emulator.sshd import free_port

    dead = free_port()  # nothing listens there
    lease = lease_for(sshd_host)
    lease.port, lease.ssh_alternatives = dead, [[sshd_host.host, sshd_host.port]]
    with SSHMachine(lease, connect_timeout=15).connect() as m:
        assert m.run(["true"]) == 0
    assert lease.port == sshd_host.port and lease.host_key == sshd_host.host_key


def test_retries_until_ssh_answers(sshd_host, caplog):
    caplog.set_level(logging.INFO, logger="qat.machine")
    sshd_host.stop()
    lease = lease_for(sshd_host)
    with pytest.raises(TransientMachineError, match="did not answer within 1s"):
        SSHMachine(lease, connect_timeout=1).connect()
    timer = threading.Timer(1.5, sshd_host.start)
    timer.start()
    try:
        with SSHMachine(lease, connect_timeout=30).connect() as m:
            assert m.run(["true"]) == 0
    finally:
        timer.join()
    assert "answered after" in caplog.text  # refused while down, then retried until it answered
