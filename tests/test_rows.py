"""Our own instance's rows while it is being created, the host-key channel the log API really serves,
and a reaper that never guesses age (issue 18 items 2-3, issue 19 findings 3 and 8).

Against the emulator's defaults: a new instance's row shows start_date, dph_total and ports null for
`half_filled_s` (default 1 s), and the log API serves the container's log (PID 1's stdout), not
onstart's output (docs/REFERENCE.md section 1b)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from infra.backends.vast import hostkeys
from infra.backends.vast.credentials import VastCredentials
from infra import reaper
from infra.backends import registry as provision
from infra.machines.machine import Lease
from infra.backends.vast.api import ProvisionError
from infra.backends.vast.instances import VastProvider
from contract.config import ConfigError, load_config


def provider(emulator, **kw) -> VastProvider:
    return VastProvider(api_key=emulator.api_key, server_url=emulator.url, **{"poll_s": 0.2, "backoff_s": 0.02, **kw})


def cfg(**overrides):
    return load_config("tiny", {"machine.provision_timeout_s": 30, **overrides}).machine


def _create(p: VastProvider, label: str) -> int:
    offer = p._sdk.search_offers(query={"rented": {"eq": False}, "disk_space": {"gte": 10}}, no_default=True)[0]
    return p._sdk.create_instance(offer["id"], image="x", disk=10, label=label)["new_contract"]


def _ready(tmp_path):
    from infra.backends import keys
    from infra.backends.ssh import pin_host_key

    pair = keys.generate_keypair(tmp_path / "key")
    return pair, pin_host_key(20, lambda m: None)


# ---------------------------------------------------------------- half-filled rows of our own instance

def test_launch_survives_its_own_half_filled_rows(emulator, tmp_path):
    """Null start_date (the SDK's show_instance computes time.time() - start_date on it), null
    dph_total and ports, past `running`: "not yet", until the row is filled; then a whole lease."""
    emulator.set_faults(label_prefix="qat-half", half_filled_s=2.5)
    p = provider(emulator)
    iid = _create(p, "qat-half-raw")
    row = p.show(iid)  # the raw row, no exception on the null start_date
    assert row is not None and row["start_date"] is None and row["dph_total"] is None and row["ports"] is None
    assert p.destroy(iid)
    pair, ready = _ready(tmp_path)
    lease = p.launch(cfg(), "qat-half", pair.public_key, key_path=str(pair.private_path), ready_check=ready)
    try:
        (entry,) = [r for r in emulator.live_instances() if r["id"] == lease.instance_id]
        assert lease.dph_total == pytest.approx(entry["dph_total"])  # waited for the filled row
        assert lease.created_at > 0 and lease.host_key_source == "provider log"
    finally:
        p.destroy(lease.instance_id)


def test_launch_with_the_emulator_defaults(emulator, tmp_path):
    """No knob: the default half-filled window and the container log. The product's own onstart."""
    pair, ready = _ready(tmp_path)
    p = provider(emulator)
    lease = p.launch(cfg(), "qat-defaults", pair.public_key, key_path=str(pair.private_path), ready_check=ready)
    try:
        assert lease.host_key_fingerprints and lease.dph_total > 0
    finally:
        p.destroy(lease.instance_id)


# ---------------------------------------------------------------- host keys where the log API reads

def test_host_keys_reach_the_log_api_through_pid1_stdout(emulator, tmp_path):
    """onstart's own output goes to /var/log/onstart.log (not served); the QAT_HOSTKEY lines are read
    from the container's log (PID 1's stdout), where the product's onstart writes them too."""
    from infra.machines.ssh_host_keys import host_key_fingerprint, parse_host_key

    pair, ready = _ready(tmp_path)
    p = provider(emulator)
    lease = p.launch(cfg(), "qat-pid1", pair.public_key, key_path=str(pair.private_path), ready_check=ready)
    try:
        info = emulator.instance_info(lease.instance_id)
        line = f"QAT_HOSTKEY ssh-ed25519 {host_key_fingerprint(parse_host_key(info['host_key']))}"
        assert line in p.logs_tail(lease.instance_id, lines=200)
        assert line in (Path(info["root"]) / "var" / "log" / "onstart.log").read_text()
    finally:
        p.destroy(lease.instance_id)


def test_an_onstart_that_prints_only_to_its_own_output_is_not_trusted(emulator, tmp_path, monkeypatch):
    """The old onstart (host keys echoed to its own stdout): the lines never reach the log API, and
    the attempt fails after `hostkey_wait_s`, not at the end of machine.provision_timeout_s."""
    pair, ready = _ready(tmp_path)
    own = hostkeys.onstart_script(pair.public_key).replace(
        '"$hk" 2>/dev/null >> "${VAST_EMULATED_PROC:-/proc}/1/fd/1"', '"$hk" >> /dev/null')
    assert own != hostkeys.onstart_script(pair.public_key)
    monkeypatch.setattr(hostkeys, "onstart_script", lambda key: own)
    with pytest.raises(ProvisionError, match="never printed the SSH host key fingerprints") as e:
        provider(emulator, hostkey_wait_s=2).launch(
            cfg(**{"machine.provision_timeout_s": 120, "machine.vast.create_attempts": 1}), "qat-own-output",
            pair.public_key, key_path=str(pair.private_path), ready_check=ready)
    assert "within 2s of running" in str(e.value)  # its own wait, not machine.provision_timeout_s
    assert "/proc/1/fd/1" in str(e.value)
    assert emulator.live_instances() == []


# ---------------------------------------------------------------- the reaper (no Prefect: run_status given)

def test_reaper_ages_a_row_without_start_date_from_its_first_sighting(emulator):
    """Our own instance being created (start_date and dph_total null) beside a real 30 h leak and a
    garbled row: the leak is reaped, the garbled row skipped and logged, the new one kept and aged
    from the reaper's first sighting, then reaped once that age passes the limit."""
    p = provider(emulator)
    emulator.set_faults(label_prefix="qat-new", half_filled_s=600)
    emulator.set_faults(label_prefix="qat-bad", garbled_fields=["dph_total", "actual_status"])
    emulator.set_faults(label_prefix="qat-leak", half_filled_s=0)
    leak, new, bad = _create(p, "qat-leak"), _create(p, "qat-new"), _create(p, "qat-bad")
    log: list[str] = []
    first_seen: dict = {}
    t = time.time() + 30 * 3600
    kw = dict(credentials={"vast": VastCredentials(emulator.api_key, emulator.url)}, log=log.append, max_age_hours=24,
              run_status=lambda label: reaper.ACTIVE, first_seen=first_seen)
    rows = reaper.reap_instances(now=t, **kw)
    assert [(r["instance_id"], r["reason"], r["destroyed"]) for r in rows] == [(leak, "older than 24 h", True)], log
    assert first_seen == {str(new): t}
    assert any("skipped: malformed" in m and "dph_total" in m for m in log), log
    assert any("no start date" in m for m in log)
    assert reaper.reap_instances(now=t + 23 * 3600, **kw) == [] and first_seen == {str(new): t}
    rows = reaper.reap_instances(now=t + 25 * 3600, **kw)
    assert [r["instance_id"] for r in rows] == [new] and rows[0]["destroyed"] and first_seen == {}
    assert [r["id"] for r in emulator.live_instances()] == [bad]
    emulator.clear_faults()
    assert p.destroy(bad)


def test_reaper_never_destroys_a_live_run_or_a_foreign_machine_by_age(emulator):
    p = provider(emulator)
    emulator.set_faults(half_filled_s=0)
    verdicts = {"qat-live": reaper.LIVE, "qat-foreign": reaper.FOREIGN, "qat-active": reaper.ACTIVE,
                "qat-unknown": reaper.UNKNOWN}
    ids = {label: _create(p, label) for label in verdicts}
    alarms: list[dict] = []
    rows = reaper.reap_instances({"vast": VastCredentials(emulator.api_key, emulator.url)}, max_age_hours=24,
                                 now=time.time() + 30 * 3600, run_status=verdicts.__getitem__,
                                 log=lambda m: None, alarm=alarms.append)
    assert sorted(r["label"] for r in rows) == ["qat-active", "qat-unknown"] and all(r["destroyed"] for r in rows)
    assert sorted((a["label"], a["verdict"]) for a in alarms) == [("qat-foreign", "foreign"), ("qat-live", "live")]
    assert all("not destroyed by age" in a["message"] and "step_timeout_s" in a["message"] for a in alarms)
    assert sorted(r["id"] for r in emulator.live_instances()) == sorted([ids["qat-live"], ids["qat-foreign"]])
    for label in ("qat-live", "qat-foreign"):
        provision.release(Lease(backend="vast", label=label, instance_id=ids[label]), VastCredentials(emulator.api_key, emulator.url))


# ---------------------------------------------------------------- configuration

def test_step_timeout_times_attempts_must_fit_the_reapers_age_limit():
    from contract.machine_config import REAPER_MAX_AGE_HOURS, STEP_ATTEMPTS

    limit_s = REAPER_MAX_AGE_HOURS * 3600 / STEP_ATTEMPTS
    assert load_config("tiny", {"machine.step_timeout_s": limit_s}).machine.step_timeout_s == limit_s
    for value in (limit_s + 1, 1e12):
        with pytest.raises(ConfigError) as e:
            load_config("tiny", {"machine.step_timeout_s": value})
        msg = str(e.value)
        assert "machine.step_timeout_s" in msg and f"{STEP_ATTEMPTS} attempts" in msg
        assert f"{REAPER_MAX_AGE_HOURS:g} h" in msg and f"at most {limit_s:g} s" in msg


def test_the_reap_deployments_age_limit_is_the_one_the_config_checks():
    import inspect

    import yaml

    from contract.machine_config import REAPER_MAX_AGE_HOURS
    from flows.reap import reap

    spec = yaml.safe_load((Path(__file__).resolve().parents[1] / "prefect.yaml").read_text())
    ages = [d["parameters"]["max_age_hours"] for d in spec["deployments"] if "max_age_hours" in (d.get("parameters") or {})]
    assert ages and all(a == REAPER_MAX_AGE_HOURS for a in ages)
    assert inspect.signature(reap.fn).parameters["max_age_hours"].default == REAPER_MAX_AGE_HOURS
