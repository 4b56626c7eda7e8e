"""VastProvider over the real vastai SDK, against the emulator (real sshd instances)."""
import time
import traceback

import pytest

from infra.vast import NoOffersError, ProvisionError, VastAPIError, VastProvider
from contract.config import load_config
from contract.machine_config import VastConfig


def provider(emulator, **kw) -> VastProvider:
    kw = {"poll_s": 0.2, "backoff_s": 0.02, **kw}
    return VastProvider(api_key=emulator.api_key, server_url=emulator.url, **kw)


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
                 "reliability >= 0.95", "cuda_max_good >= 12.1", "max_dph"):
        assert part in msg
    assert_no_key(e.value, emulator.api_key)


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
    messages = []

    def log(msg: str) -> None:
        messages.append(msg)
        if "attempt 2/" in msg:
            emulator.clear_faults()

    p = provider(emulator, log_fn=log)
    lease = p.launch(cfg(**{"machine.provision_timeout_s": 2}), "qat-stuck", "ssh-ed25519 AAAA test")
    rows = emulator.ledger()["instances"]
    assert len(rows) == 2
    first = next(r for r in rows if r["id"] != lease.instance_id)
    assert first["ended_at"] is not None and first["end_reason"] == "destroyed"
    assert first["offer_id"] != lease.extra["offer_id"]
    assert any("failed" in m and "log tail" in m for m in messages)
    p.destroy(lease.instance_id)


def test_garbled_create_answer_leaks_nothing(emulator):
    def garble_next_answer(msg: str) -> None:  # logged just before the create call
        if msg.startswith("renting offer"):
            emulator.set_faults(malformed="wrong_types", malformed_count=1)  # new_contract: "pending"

    with pytest.raises(ProvisionError, match="create refused"):
        provider(emulator, log_fn=garble_next_answer).launch(cfg(**{"machine.vast.create_attempts": 1}), "qat-garbled", "ssh-ed25519 AAAA test")
    assert len(emulator.ledger()["instances"]) == 1 and emulator.live_instances() == []


def test_exited_instance_fails_fast(emulator):
    emulator.set_faults(preempt_after_s=0, preempt_mode="exited")  # exits as soon as it runs
    t0 = time.monotonic()
    with pytest.raises(ProvisionError, match="status 'exited'"):
        provider(emulator).launch(cfg(**{"machine.provision_timeout_s": 60, "machine.vast.create_attempts": 1}),
                                  "qat-exit", "ssh-ed25519 AAAA test")
    assert time.monotonic() - t0 < 10  # not the 60 s provisioning deadline
    assert emulator.live_instances() == []


def test_all_attempts_fail_leaves_nothing_running(emulator):
    emulator.set_faults(stuck_loading=True)
    with pytest.raises(ProvisionError, match="2 attempt"):
        provider(emulator).launch(cfg(**{"machine.provision_timeout_s": 1, "machine.vast.create_attempts": 2}),
                                  "qat-never", "ssh-ed25519 AAAA test")
    assert emulator.live_instances() == []
    assert len(emulator.ledger()["instances"]) == 2


def test_429_bursts_are_retried(emulator):
    emulator.set_faults(http_429=4)
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
    p = provider(emulator)
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
        with pytest.raises(VastAPIError):
            p.find_instances("qat-")
    assert p.destroy(iid)
