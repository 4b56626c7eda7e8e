"""Bandwidth inside the budget, the market and the clock (issue 19 finding 2, issue 18 items 5 and 6).

Hosts set their own $/GB (inet_up_cost, inet_down_cost); the emulator's market has one that asks
$2/GB and hosts whose driver is too old for the pinned torch. Offers are filtered and ranked on the
run's expected bytes, every copy home has a byte cap checked before the transfer (the machine's own
size report) and while it runs (the bytes received, billed as they arrive), the pre-rent estimate
prices every step, and the train step's clock follows the GPU's expected speed."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from infra.backends.vast.credentials import VastCredentials
from contract.config import load_config
from contract.machine_config import VastConfig
from contract.workload import run_workload
from infra import gpu_speed
from infra.backends import registry as provision
from tasks.budget import RunBudget
from infra.machines.machine import Lease
from infra.machines.ssh import SSHMachine
from infra.backends.vast.api import NoOffersError
from infra.backends.vast.instances import VastProvider
from tasks import billing
from tasks.remote_step import fetch_outputs

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPk9nJ8k0u2e1k7b5n0s0n3f0c0a0b0c0d0e0f0a0b0c test"
INT8 = run_workload(load_config("int8"))


def provider(emulator) -> VastProvider:
    return VastProvider(api_key=emulator.api_key, server_url=emulator.url, poll_s=0.2, backoff_s=0.02)


def test_an_offer_with_a_high_bandwidth_price_is_not_rented_and_the_market_filters_say_what_they_left_out(emulator):
    """The cheapest RTX 4090 asks $0.29/h but $2/GB: one copy of a 9 GB checkpoint would cost $18."""
    p = provider(emulator)
    raw = p._sdk.search_offers(query={"gpu_name": {"eq": "RTX 4090"}}, no_default=True, order="dph_total")
    assert min(raw, key=lambda o: o["dph_total"])["inet_up_cost"] == 2.0
    v = VastConfig(min_disk_gb=10)
    assert v.max_inet_cost_per_gb == 0.05
    offers = p.search_offers(v)
    assert offers and all(o["inet_up_cost"] <= 0.05 and o["inet_down_cost"] <= 0.05 for o in offers)
    left = p.left_out(v)
    assert left["inet_down_cost"] + left["inet_up_cost"] == 1 and left["cuda_max_good"] >= 3
    with pytest.raises(NoOffersError, match=r"inet_down_cost <= \$0.001/GB \(max_inet_cost_per_gb\), inet_up_cost <= \$0.001/GB"):
        p.search_offers(VastConfig(min_disk_gb=10, max_inet_cost_per_gb=0.001))
    # a user who lifts the filter gets the offer, and the run's bytes still rank it behind a dearer $/h
    lifted = p.search_offers(VastConfig(min_disk_gb=10, max_inet_cost_per_gb=5), workload=INT8)
    assert any(o["inet_up_cost"] == 2.0 for o in lifted) and lifted[0]["inet_up_cost"] < 2.0


def test_offers_are_ranked_by_the_whole_run_bytes_included():
    cheap_bw = {"id": 1, "gpu_name": "RTX 4090", "dph_total": 0.34, "gpu_ram": 24564, "inet_up_cost": 0.004,
                "inet_down_cost": 0.004}
    dear_bw = {**cheap_bw, "id": 2, "dph_total": 0.30, "inet_up_cost": 2.0, "inet_down_cost": 2.0}
    ranked = gpu_speed.rank_offers([dear_bw, cheap_bw], INT8)
    assert [o["id"] for o in ranked] == [1, 2]
    assert ranked[1]["expected_usd"] - ranked[0]["expected_usd"] > 100  # ~100 GB home at $2/GB


def test_the_estimate_of_int8_lists_every_step_and_refuses_over_the_cap(emulator, monkeypatch):
    from infra.backends.vast.api import NoOffersError
    from tasks.rental import estimate_cost, estimate_table, pre_rent_estimate

    cfg = load_config("int8")
    est = provision.price_estimate(cfg.machine, VastCredentials(emulator.api_key, emulator.url), workload=run_workload(cfg))
    rows = {r["step"]: r for r in est["rows"]}
    assert list(rows) == ["set-up", "prepare", "train", "convert", "bench", "evaluate"]
    for step in ("prepare", "train", "convert", "bench", "evaluate"):
        assert rows[step]["hours"] > 0 and rows[step]["usd"] > 0, rows[step]
    assert rows["prepare"]["bytes_down"] > 3e9  # the model and the dataset
    assert rows["train"]["bytes_home"] > 9e9 and rows["convert"]["bytes_home"] > 6e9  # checkpoints, model; exports
    assert est["estimated_usd"] == pytest.approx(sum(r["usd"] for r in rows.values()), abs=1e-3)
    assert est["bandwidth_usd"] > 0 and est["inet_up_cost"] <= cfg.machine.vast.max_inet_cost_per_gb
    assert est["left_out"]["cuda_max_good"] >= 3 and est["left_out"]["inet_down_cost"] == 1
    assert "evaluate" in estimate_table(est)
    # the disk it needs: planned from the config, rented, and only offers with that disk_space
    est = pre_rent_estimate(cfg, VastCredentials(emulator.api_key, emulator.url))
    assert 50 < est["disk"]["needed_gb"] <= est["disk"]["rented_gb"] == cfg.machine.vast.min_disk_gb
    assert est["disk_space"] >= cfg.machine.vast.min_disk_gb
    assert "disk on the machine:" in estimate_table(est) and "checkpoints" in estimate_table(est)
    with pytest.raises(NoOffersError, match="disk_space"):  # no emulated offer has this much disk
        provision.price_estimate(load_config("int8", {"machine.vast.min_disk_gb": 100_000}).machine,
                                 VastCredentials(emulator.api_key, emulator.url))
    monkeypatch.setenv("VAST_API_KEY", emulator.api_key)
    monkeypatch.setenv("VAST_URL", emulator.url)
    with pytest.raises(ValueError, match=r"exceeds machine.max_cost_usd \$2.00") as e:
        estimate_cost.fn(load_config("int8", {"machine.max_cost_usd": 2}))
    assert "evaluate" in str(e.value) and "GB home" in str(e.value)


def test_the_estimate_tool_prints_the_table_the_flow_logs(capsys):
    """`python -m devtools.estimate` (docs/REFERENCE.md's bandwidth figures come from it) runs the product's
    pre-rent estimate on a throwaway emulator and says whether the cap refuses it."""
    from devtools import estimate

    assert estimate.main(["int8"]) == 0
    out = capsys.readouterr().out
    assert all(f"\n{step} " in out for step in ("set-up", "prepare", "train", "convert", "bench", "evaluate", "total"))
    assert "accepted" in out and "disk on the machine:" in out
    assert estimate.main(["int8", "machine.max_cost_usd=1"]) == 0
    assert "REFUSED before renting" in capsys.readouterr().out


def test_the_clock_follows_the_expected_speed():
    """Issue 18 item 5: an RTX 4090 (~8.7 samples/s est.) needs ~9.6 h for 300k samples, past the 6 h
    step timeout; save_every 3000 left a checkpoint up to 3 h old."""
    from infra.run_estimate import MAX_CHECKPOINT_AGE_S, TIMEOUT_MARGIN, ClockRefused, clock

    sps = gpu_speed.expected_speed("RTX 4090", INT8)["samples_per_s"]
    c = clock(INT8, sps, step_timeout_s=6 * 3600, gpu="RTX 4090")
    assert c["expected_s"] == pytest.approx(300_000 / sps, rel=1e-3)
    assert c["timeout_s"] >= c["expected_s"] * TIMEOUT_MARGIN > 6 * 3600
    assert c["checkpoint_age_s"] <= MAX_CHECKPOINT_AGE_S and c["save_every"] < 3000
    assert c["save_every"] == int(MAX_CHECKPOINT_AGE_S * sps / 32)
    fast = clock(INT8, 52.2, step_timeout_s=6 * 3600)
    assert fast["timeout_s"] == 6 * 3600  # never below the configured one
    with pytest.raises(ClockRefused, match=r"past the reaper's 24 h age limit"):
        clock(INT8, 3.0, step_timeout_s=6 * 3600, gpu="RTX 3090")


def test_the_new_gpus_are_in_the_tables_and_the_default_names():
    names = VastConfig().gpu_names
    for gpu in ("H200", "RTX 5090", "RTX 6000Ada"):
        assert gpu in names and gpu.upper() in gpu_speed.gpus()
        assert gpu_speed.expected_speed(gpu, INT8) is not None


def _hostile_du(sshd_host) -> None:
    """The machine lies about sizes: its `du` (first on PATH, as the emulator's evil mode does) says 1 byte."""
    evil = sshd_host.home.parent / "evil" / "bin"
    evil.mkdir(parents=True)
    (evil / "du").write_text('#!/bin/sh\nfor a; do f="$a"; done\nprintf "1\\t%s\\n" "$f"\n')
    os.chmod(evil / "du", 0o755)


@pytest.mark.parametrize("machine_lies", [False, True])
def test_a_copy_home_over_its_cap_is_refused_before_or_aborted_during_the_transfer(sshd_host, tmp_path, machine_lies):
    """$1/GB and $0.001 of budget left: 1 MB may come home. The step left 4 MB of incompressible output.
    An honest size report refuses it before a byte moves; a lying one is cut once 1 MB has arrived,
    and the bytes received are already in the budget."""
    out = sshd_host.home / "qat" / "work" / "evaluate"
    out.mkdir(parents=True)
    (out / "big.bin").write_bytes(os.urandom(4 * 10**6))
    (out / "result.json").write_text("{}")
    if machine_lies:
        _hostile_du(sshd_host)
    cfg = load_config("tiny", {"machine.max_cost_usd": 0.001})
    lease = Lease(backend="ssh", label="qat-bw-test", instance_id=1, host=sshd_host.host, port=sshd_host.port,
                  key_path=str(sshd_host.key_path), host_key=sshd_host.host_key, created_at=time.time(),
                  inet_up_cost=1.0)
    budget = RunBudget(cfg.machine.max_cost_usd)
    billing.register(budget, lease)
    local_work = tmp_path / "work"
    (local_work / "evaluate").mkdir(parents=True)
    (local_work / "evaluate" / "result.json").write_text("earlier")
    try:
        cap, why = billing.copy_home_cap(lease, cfg, "evaluate")
        assert 0.9e6 < cap <= 1e6 and "budget left" in why
        with SSHMachine(lease).connect(timeout=20) as m:
            with pytest.raises(billing.CopyHomeRefused) as e:
                fetch_outputs(m, "evaluate", local_work, succeeded=True, cap=cap, why=why,
                              on_bytes=billing.charge_as_it_arrives(lease, cfg, cap, why, "evaluate"))
    finally:
        billing.forget(budget)
    received = budget.machines[0].bytes_home
    if machine_lies:
        assert "aborted" in str(e.value) and cap < received <= cap + 2 * 2**20
    else:
        assert "refused before the transfer" in str(e.value) and received == 0
    assert (local_work / "evaluate" / "result.json").read_text() == "earlier"
    assert not list(local_work.glob(".evaluate.incoming-*"))


def test_the_emulator_bills_the_ssh_bytes_at_the_offers_price(emulator, tmp_path):
    p = provider(emulator)
    from infra.backends import keys

    pair = keys.generate_keypair(tmp_path / "key")
    lease = p.launch(load_config("tiny", {"machine.provision_timeout_s": 20}).machine, "qat-bytes", pair.public_key,
                     key_path=str(pair.private_path))
    try:
        disk = Path(emulator.instance_info(lease.instance_id)["disk"])
        (disk / "blob.bin").write_bytes(os.urandom(3 * 10**6))
        with SSHMachine(lease).connect(timeout=20) as m:
            m.get("blob.bin", tmp_path / "blob.bin")
        time.sleep(0.5)  # sshd logs the connection's bytes as it closes
    finally:
        p.destroy(lease.instance_id)
    row = next(r for r in emulator.ledger()["instances"] if r["id"] == lease.instance_id)
    assert row["bytes_up"] > 3 * 10**6 and row["bytes_down"] > 0
    up, down = lease.inet_up_cost, lease.inet_down_cost
    assert row["bandwidth_cost"] == pytest.approx(row["bytes_up"] / 1e9 * up + row["bytes_down"] / 1e9 * down, abs=1e-9)


def test_what_is_pushed_to_the_machine_is_billed_at_its_inet_down_cost(sshd_host, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "blob.bin").write_bytes(os.urandom(2 * 10**6))
    lease = Lease(backend="ssh", label="qat-push-test", instance_id=2, host=sshd_host.host, port=sshd_host.port,
                  key_path=str(sshd_host.key_path), host_key=sshd_host.host_key, created_at=time.time(),
                  inet_up_cost=0.0, inet_down_cost=0.5)
    budget = RunBudget(1.0)
    billing.register(budget, lease)
    try:
        with SSHMachine(lease).connect(timeout=20) as m:
            sent = m.put(src, "pushed", include=["blob.bin"], respect_gitignore=False)
        billing.record_bytes_down(lease, sent)
    finally:
        billing.forget(budget)
    assert sent > 2 * 10**6 and (sshd_host.home / "pushed" / "blob.bin").stat().st_size == 2 * 10**6
    meter = budget.machines[0]
    assert meter.bandwidth_usd() == pytest.approx(sent / 1e9 * 0.5)
    assert any("pushed to the machine at $0.5/GB" in r["step"] for r in meter.as_rows())
