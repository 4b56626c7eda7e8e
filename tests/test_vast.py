"""VastProvider over the real vastai SDK, against the emulator (real sshd instances)."""
import os
import time
import traceback

import pytest

from infra.backends.vast import hostkeys
from infra.backends.vast.credentials import VastCredentials
from infra.backends.vast.api import NoOffersError, ProvisionError, VastAPIError
from infra.backends.vast.instances import VastProvider
from contract.config import load_config
from contract.machine_config import VastConfig


def provider(emulator, **kw) -> VastProvider:
    kw = {"poll_s": 0.2, "backoff_s": 0.02, **kw}
    return VastProvider(api_key=emulator.api_key, server_url=emulator.url, **kw)


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """Every wait the provider makes (infra/backends/vast api.py and instances.py sleep through their
    `time`), in order; still real waits, since the emulator's lags are real time."""
    from infra.backends.vast import api, instances

    made: list[float] = []

    class RecordedTime:
        def sleep(self, seconds: float) -> None:
            made.append(seconds)
            time.sleep(seconds)

        def __getattr__(self, name: str):
            return getattr(time, name)

    for module in (api, instances):
        monkeypatch.setattr(module, "time", RecordedTime())
    return made


def faults_end_at_attempt_2(emulator, messages: list[str]):
    """A provider log_fn: each message kept in `messages`; the emulator's faults cleared once attempt 2 starts."""
    def log(msg: str) -> None:
        messages.append(msg)
        if "attempt 2/" in msg:
            emulator.clear_faults()

    return log


def cfg(**overrides):
    return load_config("tiny", {"machine.provision_timeout_s": 20, **overrides}).machine


def assert_no_key(exc: BaseException, key: str) -> None:
    text = "".join(traceback.format_exception(exc))
    assert key not in text, text


def test_search_cheapest_first_and_filtered(emulator):
    v = VastConfig(min_disk_gb=100, min_reliability=0.98)
    offers = provider(emulator).search_offers(v)
    assert len(offers) >= 2
    prices = [o["dph_total"] for o in offers]
    assert prices == sorted(prices)
    for o in offers:
        assert o["gpu_name"] in v.gpu_names and o["reliability"] >= 0.98 and o["disk_space"] >= 100
        assert o["gpu_ram"] >= 24000 and o["verified"] and o["dph_total"] <= v.max_dph


def test_no_match_names_the_filters(emulator):
    v = VastConfig(gpu_names=["RTX 4090"], min_gpu_ram_gb=80)
    with pytest.raises(NoOffersError) as e:
        provider(emulator).search_offers(v)
    msg = str(e.value)
    for part in ("gpu_name in ['RTX 4090']", "gpu_ram >= 80 GB", "min_gpu_ram_gb", "disk_space >= 80 GB",
                 "reliability >= 0.95", "cuda_max_good >= 13 (min_cuda)", "max_dph"):
        assert part in msg
    assert_no_key(e.value, emulator.api_key)


def test_an_offer_whose_driver_is_too_old_for_the_pinned_torch_is_not_rented(emulator, tmp_path):
    """The RTX 3090 offer is the cheapest but its driver supports CUDA 12.2; torch 2.13.0 needs 13.0."""
    v = VastConfig(gpu_names=["RTX 3090", "RTX 4090"], min_disk_gb=10)
    assert v.min_cuda == 13.0
    p = provider(emulator)
    assert p._sdk.search_offers(query={"gpu_name": {"eq": "RTX 3090"}}, no_default=True)[0]["cuda_max_good"] < 13
    offers = p.search_offers(v)
    assert offers and all(o["cuda_max_good"] >= 13.0 for o in offers) and offers[0]["gpu_name"] == "RTX 4090"
    lease = p.launch(cfg(**{"machine.vast.gpu_names": ["RTX 3090", "RTX 4090"]}), "qat-driver",
                     "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPk9nJ8k0u2e1k7b5n0s0n3f0c0a0b0c0d0e0f0a0b0c test")
    try:
        assert lease.gpu_name == "RTX 4090"
    finally:
        p.destroy(lease.instance_id)
    with pytest.raises(NoOffersError, match=r"cuda_max_good >= 13 \(min_cuda\)"):
        p.search_offers(VastConfig(gpu_names=["RTX 3090"], min_disk_gb=10))


def test_launch_and_destroy_confirmed(emulator, tmp_path):
    p = provider(emulator)
    lease = p.launch(cfg(), "qat-launch", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPk9nJ8k0u2e1k7b5n0s0n3f0c0a0b0c0d0e0f0a0b0c test")
    assert lease.instance_id and lease.host == "127.0.0.1" and lease.port and lease.dph_total > 0
    assert lease.gpu_name and lease.created_at > 0
    assert [i["label"] for i in p.find_instances("qat-")] == ["qat-launch"]
    assert p.is_running(lease.instance_id)
    assert p.destroy(lease.instance_id) is True
    assert p.destroy(lease.instance_id) is True  # idempotent
    assert p.find_instances("qat-") == []
    assert emulator.live_instances() == []


def test_stuck_loading_moves_to_the_next_offer(emulator):
    emulator.set_faults(stuck_loading=True)
    messages: list[str] = []
    p = provider(emulator, log_fn=faults_end_at_attempt_2(emulator, messages))
    lease = p.launch(cfg(**{"machine.provision_timeout_s": 2}), "qat-stuck", "ssh-ed25519 AAAA test")
    rows = emulator.ledger()["instances"]
    assert len(rows) == 2
    first = next(r for r in rows if r["id"] != lease.instance_id)
    assert first["ended_at"] is not None and first["end_reason"] == "destroyed"
    assert first["offer_id"] != lease.offer_id
    assert any("failed" in m and "log tail" in m for m in messages)
    p.destroy(lease.instance_id)


def test_garbled_create_answer_is_adopted_not_rented_twice(emulator):
    def garble_next_answer(msg: str) -> None:  # logged just before the create call
        if msg.startswith("renting offer"):
            emulator.set_faults(malformed="wrong_types", malformed_count=1)  # new_contract: "pending"

    p = provider(emulator, log_fn=garble_next_answer)
    lease = p.launch(cfg(**{"machine.vast.create_attempts": 1}), "qat-garbled", "ssh-ed25519 AAAA test")
    (row,) = emulator.ledger()["instances"]  # the instance the garbled answer was about, used
    assert row["id"] == lease.instance_id and row["ended_at"] is None
    assert p.destroy(lease.instance_id) and emulator.live_instances() == []


def test_exited_instance_fails_fast(emulator):
    emulator.set_faults(preempt_after_s=0, preempt_mode="exited")  # exits as soon as it runs
    with pytest.raises(ProvisionError, match="failed to start: status 'exited'") as e:
        provider(emulator).launch(cfg(**{"machine.provision_timeout_s": 60, "machine.vast.create_attempts": 1}),
                                  "qat-exit", "ssh-ed25519 AAAA test")
    assert "not running after" not in str(e.value)  # failed on the status, not at the 60 s provisioning deadline
    assert emulator.live_instances() == []


def test_all_attempts_fail_leaves_nothing_running(emulator):
    emulator.set_faults(stuck_loading=True)
    with pytest.raises(ProvisionError, match="2 attempt"):
        provider(emulator).launch(cfg(**{"machine.provision_timeout_s": 1, "machine.vast.create_attempts": 2}),
                                  "qat-never", "ssh-ed25519 AAAA test")
    assert emulator.live_instances() == []
    assert len(emulator.ledger()["instances"]) == 2


def test_429_bursts_are_retried(emulator):
    emulator.set_faults(http_429=4, http_429_retry_after=0)
    assert provider(emulator).search_offers(VastConfig())
    emulator.set_faults(http_429=50)
    with pytest.raises(VastAPIError, match="HTTP 429") as e:
        provider(emulator, retries=3).search_offers(VastConfig())
    assert_no_key(e.value, emulator.api_key)


def test_destroy_fail_once_still_confirmed(emulator):
    p = provider(emulator)
    for mode in ("error", "silent"):  # a 500, then a success that destroyed nothing
        offer = p.search_offers(VastConfig(min_disk_gb=10))[0]
        iid = p._sdk.create_instance(offer["id"], image="x", disk=10, label="qat-d")["new_contract"]
        emulator.set_faults(id=iid, destroy_fail_once=mode)
        assert p.destroy(iid) is True
        row = next(r for r in emulator.ledger()["instances"] if r["id"] == iid)
        assert row["ended_at"] is not None, mode


def test_key_never_in_errors(emulator, monkeypatch):
    bad = VastProvider(api_key="sk-wrong-key-12345", server_url=emulator.url, backoff_s=0.01)
    with pytest.raises(VastAPIError, match="HTTP 401.*API key") as e:
        bad.search_offers(VastConfig())
    assert_no_key(e.value, "sk-wrong-key-12345")
    p = provider(emulator)
    assert p.redact(f"GET {emulator.url}/api/v0/x?owner=me&api_key={emulator.api_key}&q=1") == \
        f"GET {emulator.url}/api/v0/x?owner=me&api_key=***&q=1"
    assert emulator.api_key not in repr(p)
    monkeypatch.delenv("VAST_API_KEY", raising=False)
    with pytest.raises(VastAPIError, match="no Vast.ai API key"):
        VastProvider(server_url=emulator.url)


def test_malformed_responses_are_clear_errors(emulator):
    log: list[str] = []
    p = provider(emulator, log_fn=log.append)
    offer = p.search_offers(VastConfig(min_disk_gb=10))[0]
    iid = p._sdk.create_instance(offer["id"], image="x", disk=10, label="qat-m")["new_contract"]
    for mode in ("html", "missing_fields", "wrong_types", "truncated", "empty"):
        emulator.set_faults(malformed=mode, malformed_count=1)
        with pytest.raises(VastAPIError) as e:
            p.show(iid)
        assert "Vast.ai show instance" in str(e.value), mode
        assert_no_key(e.value, emulator.api_key)
        emulator.set_faults(malformed=mode, malformed_count=1)
        with pytest.raises(VastAPIError):
            p.search_offers(VastConfig(min_disk_gb=10))
        emulator.set_faults(malformed=mode, malformed_count=1)
        if mode in ("missing_fields", "wrong_types"):  # a readable listing with a bad row: skipped, said
            log.clear()
            assert p.find_instances("qat-") == [] and any(m.startswith("skipped: malformed") for m in log), mode
            continue
        with pytest.raises(VastAPIError):
            p.find_instances("qat-")
    assert p.destroy(iid)


# ---------------------------------------------------------------- host key from the provider's channel

def _ready(tmp_path):
    from infra.backends import keys
    from infra.backends.ssh import pin_host_key

    pair = keys.generate_keypair(tmp_path / "key")
    return pair, pin_host_key(20, lambda m: None)


def test_host_key_is_pinned_from_the_instance_log_before_ssh(emulator, tmp_path):
    from infra.machines.ssh_host_keys import host_key_fingerprint, parse_host_key

    pair, ready = _ready(tmp_path)
    p = provider(emulator)
    lease = p.launch(cfg(), "qat-hostkey", pair.public_key, key_path=str(pair.private_path), ready_check=ready)
    try:
        info = emulator.instance_info(lease.instance_id)
        fp = host_key_fingerprint(parse_host_key(info["host_key"]))
        assert lease.host_key_fingerprints == [f"ssh-ed25519 {fp}"]  # what onstart printed, read over the API
        assert lease.host_key == info["host_key"] and lease.host_key_source == "provider log"
        assert f"QAT_HOSTKEY ssh-ed25519 {fp}" in p.logs_tail(lease.instance_id, lines=200)
    finally:
        p.destroy(lease.instance_id)


def test_no_host_key_line_in_the_log_fails_the_attempt(emulator, tmp_path, monkeypatch):
    pair, ready = _ready(tmp_path)
    k = pair.public_key
    monkeypatch.setattr(hostkeys, "onstart_script", lambda key: f"mkdir -p ~/.ssh && echo '{k}' >> ~/.ssh/authorized_keys")
    with pytest.raises(ProvisionError, match="never printed the SSH host key fingerprints") as e:
        provider(emulator).launch(cfg(**{"machine.provision_timeout_s": 3, "machine.vast.create_attempts": 1}),
                                  "qat-nokey", k, key_path=str(pair.private_path), ready_check=ready)
    assert "QAT_HOSTKEY" in str(e.value)
    assert emulator.live_instances() == [] and len(emulator.ledger()["instances"]) == 1


def test_a_host_key_other_than_the_logged_one_is_refused(emulator, tmp_path, monkeypatch):
    """The log names one key, SSH answers with another (a man in the middle): no connection is
    trusted, the attempt fails, the next offer is tried, every instance is destroyed."""
    pair, ready = _ready(tmp_path)
    k = pair.public_key
    forged = "QAT_HOSTKEY ssh-ed25519 SHA256:" + "A" * 43
    monkeypatch.setattr(hostkeys, "onstart_script",  # to the container's log (PID 1's stdout)
                        lambda key: f"echo '{forged}' >> \"$VAST_EMULATED_PROC/1/fd/1\"; "
                                    f"mkdir -p ~/.ssh && echo '{k}' >> ~/.ssh/authorized_keys")
    with pytest.raises(ProvisionError, match="2 attempt") as e:
        provider(emulator).launch(cfg(**{"machine.vast.create_attempts": 2}), "qat-mitm", k,
                                  key_path=str(pair.private_path), ready_check=ready)
    assert str(e.value).count("HostKeyMismatch") == 2 and "not among" in str(e.value)
    assert emulator.live_instances() == [] and len(emulator.ledger()["instances"]) == 2


def test_parse_host_keys_takes_whole_lines_only():
    good = "SHA256:" + "b" * 43
    text = "\n".join([f"QAT_HOSTKEY ssh-ed25519 {good}", f"Invalid user QAT_HOSTKEY ssh-rsa {good} from 1.2.3.4",
                      f"QAT_HOSTKEY ssh-ed25519 {good}\r", "QAT_HOSTKEY ssh-rsa SHA256:short",
                      f"QAT_HOSTKEY ecdsa-sha2-nistp256 {good} trailing"])
    assert hostkeys.parse_host_keys(text) == [f"ssh-ed25519 {good}"]


def test_the_run_key_pair_is_deleted_once_its_machine_is_destroyed(emulator, fast_polling, tmp_path):
    from infra.backends import registry as provision
    from infra.machines.machine import Lease
    from tasks.rental import delete_run_key

    lease = provision.acquire(cfg(), "qat-keys", tmp_path, VastCredentials(emulator.api_key, emulator.url),
                              log=lambda m: None)
    key = tmp_path / "ssh" / "qat-keys" / "id_ed25519"
    assert lease.key_path == str(key) and key.is_file() and lease.run_key_dir == str(key.parent)
    assert lease.host_key_source == "provider log"
    assert provision.release(lease, VastCredentials(emulator.api_key, emulator.url)) is True
    assert delete_run_key(lease) is True
    assert not key.exists() and not key.with_name("id_ed25519.pub").exists() and not key.parent.exists()
    assert delete_run_key(lease) is False  # idempotent
    # a key the user owns (backend ssh: no run_key_dir) is never touched
    own = tmp_path / "own_key"
    own.write_text("private")
    assert delete_run_key(Lease(backend="ssh", label="x", key_path=str(own))) is False and own.exists()
    assert delete_run_key(Lease(backend="vast", label="x", key_path=str(own),
                                run_key_dir=str(tmp_path / "ssh" / "elsewhere"))) is False and own.exists()


# ---------------------------------------------------------------- first contact: orphans, duplicates, status, 429s

PUB = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFirstContact test"


def _create(p, label="qat-raw"):
    offer = p.search_offers(VastConfig(min_disk_gb=10))[0]
    return p._sdk.create_instance(offer["id"], image="x", disk=10, label=label)["new_contract"]


@pytest.mark.parametrize("mode", ["504", "drop"])
def test_lost_create_answer_rents_one_machine_and_uses_it(emulator, mode):
    """The server creates the instance but the answer is lost (gateway 504 / connection closed), and
    the list shows new instances only 1.5 s later: create is not re-sent, the instance is found by
    label and adopted; exactly one instance was ever rented."""
    emulator.set_faults(lost_create=1, lost_create_mode=mode, list_lag_s=1.5)
    p = provider(emulator, create_settle_s=5)
    lease = p.launch(cfg(**{"machine.vast.create_attempts": 2}), "qat-lost", PUB)
    rows = emulator.ledger()["instances"]
    assert [r["id"] for r in rows] == [lease.instance_id], rows  # one rented, no duplicate
    assert p.destroy(lease.instance_id) and emulator.live_instances() == []


def test_lost_create_answer_seen_late_is_destroyed_not_leaked(emulator):
    """The list lags longer than the look after the lost answer: the next attempt rents another
    machine, and the late one is destroyed once it shows (0 leaked)."""
    emulator.set_faults(lost_create=1, list_lag_s=2.5, boot_seconds=3)
    emulator.set_faults(label_prefix="qat-", boot_seconds=3)
    p = provider(emulator, create_settle_s=0.3)
    lease = p.launch(cfg(**{"machine.vast.create_attempts": 2}), "qat-late", PUB)
    rows = emulator.ledger()["instances"]
    assert len(rows) == 2
    other = next(r for r in rows if r["id"] != lease.instance_id)
    assert other["ended_at"] is not None and other["end_reason"] == "destroyed", rows
    assert p.destroy(lease.instance_id) and emulator.live_instances() == []


def test_show_null_right_after_create_is_tolerated(emulator):
    emulator.set_faults(label_prefix="qat-", null_after_create_s=1.5)
    p = provider(emulator)
    lease = p.launch(cfg(), "qat-null", PUB)
    assert p.is_running(lease.instance_id)
    assert p.destroy(lease.instance_id) and emulator.live_instances() == []


def test_destroy_while_show_is_still_null_sends_delete(emulator):
    emulator.set_faults(label_prefix="qat-", null_after_create_s=30)
    p = provider(emulator)
    iid = _create(p, "qat-null-destroy")
    assert p.show(iid) is None
    assert p.destroy(iid) is True
    (row,) = emulator.ledger()["instances"]
    assert row["end_reason"] == "destroyed"  # DELETE was sent, not skipped on the null


def test_destroy_lag_then_404_is_confirmed(emulator, sleeps):
    # the row stays visible 2 s after the DELETE: destroy's first look comes one request later
    emulator.set_faults(label_prefix="qat-", destroy_lag_s=2.0)
    p = provider(emulator)
    iid = _create(p, "qat-lag")
    shown, show = [], p.show
    p.show = lambda instance_id: shown.append(show(instance_id)) or shown[-1]
    sleeps.clear()
    assert p.destroy(iid, timeout_s=20) is True
    # it saw the destroying row, waited and looked again until it was gone (True: before its timeout)
    assert shown[0] is not None and shown[0]["status_msg"] == "Destroying instance..."
    assert sleeps, "confirmed while the row was still visible"
    (row,) = emulator.ledger()["instances"]
    assert row["end_reason"] == "destroyed"
    assert p.show(iid) is None  # 404 now: gone
    assert p.destroy(iid) is True  # idempotent on a 404


def test_outbid_stopped_at_start_fails_over(emulator):
    emulator.set_faults(preempt_after_s=0, preempt_mode="stopped")
    messages: list[str] = []
    p = provider(emulator, log_fn=faults_end_at_attempt_2(emulator, messages))
    lease = p.launch(cfg(**{"machine.provision_timeout_s": 60, "machine.vast.create_attempts": 2}), "qat-outbid", PUB)
    # failed at once on `stopped`, not at the 60 s provisioning deadline
    assert any("failed to start: status 'stopped'" in m for m in messages)
    assert not any("not running after" in m for m in messages)
    first = next(r for r in emulator.ledger()["instances"] if r["id"] != lease.instance_id)
    assert first["end_reason"] == "destroyed"
    assert p.destroy(lease.instance_id)


def test_outbid_running_instance_is_not_alive_and_bills_storage(emulator):
    p = provider(emulator)
    lease = p.launch(cfg(), "qat-run-outbid", PUB)
    emulator.set_faults(id=lease.instance_id, preempt_after_s=0, preempt_mode="stopped")
    deadline = time.monotonic() + 5
    while p.is_running(lease.instance_id) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not p.is_running(lease.instance_id)
    assert p.show(lease.instance_id)["actual_status"] == "stopped"
    (row,) = emulator.live_instances()
    assert row["status"] == "stopped"
    time.sleep(0.3)
    assert emulator.live_instances()[0]["stopped_seconds"] > 0  # still billing (storage)
    assert p.destroy(lease.instance_id)


def test_foreign_rows_with_null_fields_do_not_blind_us(emulator):
    from infra.backends.vast.backend import VastBackend

    emulator.set_faults(foreign_rows=30)  # > one page of 25: paging too
    p = provider(emulator)
    iid = _create(p, "qat-mine")
    assert [r["id"] for r in p.find_instances("qat-")] == [iid]
    leases = VastBackend().find_instances("qat-", VastCredentials(emulator.api_key, emulator.url))
    assert [lease.instance_id for lease in leases] == [iid]
    assert p.destroy(iid) and p.find_instances("qat-") == []


def test_retry_after_is_honoured(emulator, sleeps):
    emulator.set_faults(http_429=2, http_429_retry_after=0.7)
    assert provider(emulator).search_offers(VastConfig())
    assert sleeps == [0.7, 0.7]  # two waits of Retry-After's 0.7 s (not the 0.02 s backoff)


def test_search_quota_429_is_not_retried(emulator):
    from infra.backends.vast.api import SearchQuotaExceeded
    from tasks.retry import is_transient

    emulator.set_faults(quota_429=5)
    with pytest.raises(SearchQuotaExceeded, match="daily search quota exceeded; retry after UTC midnight") as e:
        provider(emulator).search_offers(VastConfig())
    assert not is_transient(e.value)
    assert emulator.admin("GET", "/_emulator/faults")["quota_429"] == 4  # one request, not retried
    with pytest.raises(SearchQuotaExceeded):
        provider(emulator).launch(cfg(), "qat-quota", PUB)
    assert emulator.ledger()["instances"] == []
    emulator.clear_faults()


def test_onstart_prints_the_host_key_fingerprints_with_or_without_ssh_keygen(tmp_path):
    """pytorch/pytorch images have no ssh-keygen of their own: onstart computes the same SHA256
    fingerprint with the image's python, and both reach PID 1's stdout (the log API's source)."""
    import shutil
    import subprocess
    import sys

    etc, proc = tmp_path / "etc", tmp_path / "proc"
    (etc / "ssh").mkdir(parents=True)
    (proc / "1" / "fd").mkdir(parents=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(etc / "ssh" / "ssh_host_ed25519_key")], check=True)
    want = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(etc / "ssh" / "ssh_host_ed25519_key.pub")],
                          check=True, capture_output=True, text=True).stdout.split()[1]
    bare = tmp_path / "bin"  # a PATH with a shell, coreutils and python, but no ssh-keygen
    bare.mkdir()
    for tool in ("sh", "bash", "cut", "ls", "grep", "env", "mv", "mkdir", "chmod", "touch", "cat", "python3"):
        os.symlink(sys.executable if tool == "python3" else shutil.which(tool), bare / tool)
    script = hostkeys.onstart_script("ssh-ed25519 AAAAC3Nza test@qat")
    for path in (os.environ["PATH"], str(bare)):
        (proc / "1" / "fd" / "1").write_text("")
        env = {"PATH": path, "HOME": str(tmp_path), "VAST_EMULATED_ETC": str(etc), "VAST_EMULATED_PROC": str(proc)}
        out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        for text in (out.stdout, (proc / "1" / "fd" / "1").read_text()):
            assert hostkeys.parse_host_keys(text) == [f"ssh-ed25519 {want}"], (path, text, out.stderr)


def test_a_machine_is_gone_only_when_the_provider_says_so(emulator, monkeypatch):
    """tasks/rental.py machine_gone, which decides whether a failed step's machine is replaced: an API that
    cannot answer (a garbled page, every retry) does not give up a running machine; a destroyed one is gone."""
    from devtools.services import wait_for
    from infra.machines.machine import Lease
    from tasks.rental import machine_gone

    monkeypatch.setenv("VAST_API_KEY", emulator.api_key)
    monkeypatch.setenv("VAST_URL", emulator.url)
    p = provider(emulator)
    offer = p.search_offers(VastConfig(min_disk_gb=10))[0]
    iid = p._sdk.create_instance(offer["id"], image="x", disk=10, label="qat-gone")["new_contract"]
    wait_for(lambda: p.is_running(iid), 30, 0.2, "the instance to run")
    lease = Lease(backend="vast", label="qat-gone", instance_id=iid)
    assert not machine_gone(lease)
    emulator.set_faults(malformed="html", malformed_count=20)
    assert not machine_gone(lease)  # cannot tell: kept, its step retried on it
    emulator.clear_faults()
    assert p.destroy(iid)
    assert machine_gone(lease)
