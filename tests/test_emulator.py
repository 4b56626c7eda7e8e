"""The Vast.ai emulator, driven by the real vastai SDK, paramiko and plain HTTP."""
from __future__ import annotations

import io
import json
import os
import re
import sys
import time
import warnings
from pathlib import Path

import paramiko
import pytest
import requests
from vastai import VastAI

from devtools.emulator.image import IMAGE_DIR
from devtools.emulator.sshd import make_client_key, pid_alive, port_open

# What a Vast.ai onstart must do for SSH commands to run (docs/REFERENCE.md section 7): tmux off, the
# image's environment into /etc/environment (the emulator's stand-in: $VAST_EMULATED_ETC/environment)
ONSTART = ('touch ~/.no_auto_tmux && env > "$VAST_EMULATED_ETC/environment" && '
           "mkdir -p ~/.ssh && echo '{pub}' >> ~/.ssh/authorized_keys && echo onstart-ran-in-$PWD")
KEY_ONLY = "mkdir -p ~/.ssh && echo '{pub}' >> ~/.ssh/authorized_keys"


@pytest.fixture
def sdk(emulator):
    # rows filled at once: the SDK's show_instance(s) die on a null start_date (the half-filled rows of
    # instances being created are tested in test_half_filled_rows_by_default)
    emulator.set_faults(half_filled_s=0)
    return VastAI(api_key=emulator.api_key, server_url=emulator.url)


@pytest.fixture
def client_key(tmp_path):
    key = tmp_path / "id_ed25519"
    return key, make_client_key(key)


def wait_status(sdk, iid, want, timeout=8.0):
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = sdk.show_instance(iid)
        status = row["actual_status"] if row else None
        if not seen or seen[-1] != status:
            seen.append(status)
        if status == want:
            return row, seen
        time.sleep(0.05)
    raise AssertionError(f"instance {iid} never reached {want}: saw {seen}")


def ssh(port, key, timeout=5.0, retry_until=0.0):
    """A connected paramiko client; retries refused connections for `retry_until` seconds."""
    deadline = time.monotonic() + retry_until
    while True:
        c = paramiko.SSHClient()
        c.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        try:
            c.connect("127.0.0.1", port, username="root", key_filename=str(key), allow_agent=False,
                      look_for_keys=False, timeout=timeout, banner_timeout=timeout, auth_timeout=timeout)
            return c
        except (OSError, paramiko.SSHException):
            c.close()
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)


def run(c, cmd):
    _, out, err = c.exec_command(cmd, timeout=20)
    code = out.channel.recv_exit_status()
    return code, out.read().decode(), err.read().decode()


def create(sdk, pub, label="t-inst", offer=None, onstart=ONSTART, **kw):
    offer = offer or sdk.search_offers("num_gpus=1", order="dph_total", limit=1)[0]["id"]
    r = sdk.create_instance(offer, image="pytorch/pytorch", disk=20, label=label,
                            onstart_cmd=onstart.format(pub=pub), ssh=True, direct=True, **kw)
    assert r["success"] is True and isinstance(r["new_contract"], int)
    return r["new_contract"]


# --------------------------------------------------------------------------------- search --
def test_search_filters_order_limit_and_types(emulator, sdk):
    rows = sdk.search_offers("gpu_ram>=40 reliability>0.99", order="dph_total", limit=20)
    assert rows and all(r["gpu_ram"] >= 40000 and r["reliability"] > 0.99 for r in rows)
    prices = [r["dph_total"] for r in rows]
    assert prices == sorted(prices)
    assert len(sdk.search_offers(limit=3)) == 3
    # default filters hide unverified offers; no_default shows them
    assert all(r["verified"] for r in sdk.search_offers())
    assert any(not r["verified"] for r in sdk.search_offers(no_default=True))
    # names with underscores, in-lists and descending order
    assert {r["gpu_name"] for r in sdk.search_offers("gpu_name=RTX_4090")} == {"RTX 4090"}
    geo = sdk.search_offers("geolocation in [FR,DE]", order="dph_total-")
    assert {r["geolocation"] for r in geo} == {"France, FR", "Germany, DE"}
    assert geo[0]["dph_total"] >= geo[-1]["dph_total"]
    # a raw body with numbers as strings, storage pricing and bid type
    body = {"num_gpus": {"eq": "1"}, "gpu_ram": {"gte": "20000"}, "cuda_max_good": {"gte": "12.4"},
            "verified": {"eq": True}, "rentable": {"eq": True}, "order": [["dph_total", "asc"]],
            "type": "on-demand", "limit": 5, "allocated_storage": 100.0}
    r = requests.post(f"{emulator.url}/api/v0/bundles/", json=body,
                      headers={"Authorization": f"Bearer {emulator.api_key}"}, timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/json"
    on_demand = r.json()["offers"]
    assert on_demand and all(o["num_gpus"] == 1 and o["cuda_max_good"] >= 12.4 for o in on_demand)
    o = on_demand[0]
    assert o["dph_total"] == pytest.approx(o["dph_base"] + o["storage_cost"] * 100 / 720, abs=1e-5)
    bid = {x["id"]: x for x in sdk.search_offers(type="bid", limit=50)}
    assert bid[o["id"]]["dph_total"] < o["dph_total"]
    bad = requests.post(f"{emulator.url}/api/v0/bundles/", json={"gpu_ram": {"gte": "lots"}},
                        headers={"Authorization": f"Bearer {emulator.api_key}"}, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_args"


def test_auth_bearer_query_key_and_401(emulator):
    wrong = VastAI(api_key="not-the-key", server_url=emulator.url)
    with pytest.raises(requests.HTTPError) as e:
        wrong.search_offers()
    assert e.value.response.status_code == 401
    url = f"{emulator.url}/api/v0/users/current"
    assert requests.get(url, timeout=10).status_code == 401
    assert requests.get(url, params={"api_key": emulator.api_key}, timeout=10).status_code == 200
    user = VastAI(api_key=emulator.api_key, server_url=emulator.url).show_user()
    assert user["balance"] == pytest.approx(50.0) and "api_key" not in user


# ------------------------------------------------------------------------------ lifecycle --
def test_instance_lifecycle_ssh_sftp_logs_label_destroy_billing(emulator, sdk, client_key, tmp_path):
    key, pub = client_key
    iid = create(sdk, pub, env={"-p 8000:8000": "1", "RUN_ID": "r42"})
    row, seen = wait_status(sdk, iid, "running")
    assert seen[0] in ("created", "loading") and seen[-1] == "running"
    for field in ("intended_status", "cur_state", "ssh_host", "ssh_port", "public_ipaddr", "start_date", "dph_total",
                  "label", "machine_id", "gpu_name", "num_gpus", "gpu_ram", "disk_space", "status_msg", "geolocation"):
        assert field in row, field
    assert row["ssh_host"] == "127.0.0.1" and isinstance(row["ssh_port"], int)
    assert row["ports"]["22/tcp"][0]["HostPort"] == str(row["ssh_port"]) and "8000/tcp" in row["ports"]
    assert row["extra_env"]["RUN_ID"] == "r42" and row["label"] == "t-inst"
    info = emulator.instance_info(iid)
    disk = Path(info["disk"])

    c = ssh(row["ssh_port"], key, retry_until=5)
    code, out, _ = run(c, "pwd; echo $HOME; echo $VAST_EMULATED $RUN_ID; command -v python")
    assert code == 0
    # the instance env and the image's python come through what onstart wrote to /etc/environment
    assert out.split() == [str(disk), str(disk), "1", "r42", str(IMAGE_DIR / "venv" / "bin" / "python")]
    assert c.get_transport().get_remote_server_key().get_base64() == info["host_key"].split()[1]
    sftp = c.open_sftp()
    sftp.mkdir("qat")
    sftp.putfo(io.BytesIO(b"payload"), "qat/x.txt")
    assert (disk / "qat" / "x.txt").read_bytes() == b"payload"
    assert run(c, "cat qat/x.txt")[1] == "payload"
    assert run(c, "exit 7")[0] == 7
    c.close()

    # attach_ssh authorizes a second key
    key2 = tmp_path / "second"
    assert sdk.attach_ssh(iid, make_client_key(key2))["success"] is True
    ssh(row["ssh_port"], key2).close()

    assert sdk.label_instance(iid, "t-renamed")["success"] is True
    assert sdk.show_instance(iid)["label"] == "t-renamed"
    assert [r["id"] for r in sdk.show_instances()] == [iid]
    # SSH launch mode: onstart's output is in /var/log/onstart.log, not in the container log the API serves
    assert f"onstart-ran-in-{disk}" not in sdk.logs(iid, tail="100")
    assert f"onstart-ran-in-{disk}" in (Path(info["root"]) / "var" / "log" / "onstart.log").read_text()

    time.sleep(0.3)
    before = sdk.show_user()["balance"]
    assert sdk.destroy_instance(iid)["success"] is True
    assert sdk.show_instance(iid) is None and sdk.show_instances() == []
    assert not disk.exists() and not port_open(row["ssh_port"]) and not pid_alive(info["sshd_pid"])
    led = emulator.ledger()
    (entry,) = led["instances"]
    assert entry["ended_at"] is not None and entry["end_reason"] == "destroyed"
    assert entry["bandwidth_cost"] > 0 and entry["bytes_up"] > 0  # the SSH session above, at the offer's $/GB
    assert entry["cost"] == pytest.approx(entry["dph_total"] * entry["seconds"] / 3600 + entry["bandwidth_cost"], rel=1e-4)
    after = sdk.show_user()["balance"]
    assert after == pytest.approx(50.0 - entry["cost"], abs=1e-7) and after < before
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        inv = sdk.show_invoices(only_charges=True)
    assert [(r["instance_id"], r["amount"]) for r in inv["invoices"]] == [(iid, entry["cost"])]
    # the offer is rentable again, unknown ids answer like Vast
    with pytest.raises(requests.HTTPError) as e:
        sdk.destroy_instance(iid)
    assert e.value.response.status_code == 404


def test_offer_cannot_be_rented_twice(emulator, sdk, client_key):
    _, pub = client_key
    offer = sdk.search_offers(order="dph_total", limit=1)[0]["id"]
    iid = create(sdk, pub, offer=offer)
    assert offer not in [o["id"] for o in sdk.search_offers(limit=50)]
    with pytest.raises(requests.HTTPError) as e:
        create(sdk, pub, offer=offer)
    assert e.value.response.status_code == 400 and "no longer available" in e.value.response.json()["msg"]
    sdk.destroy_instance(iid)
    assert offer in [o["id"] for o in sdk.search_offers(limit=50)]


def test_show_instances_pages_and_filters(emulator, sdk, client_key):
    _, pub = client_key
    ids = [create(sdk, pub, label=f"page-{n}", offer=o["id"])
           for n, o in enumerate(sdk.search_offers(no_default=True, limit=3))]
    r = requests.get(f"{emulator.url}/api/v1/instances/", timeout=10,
                     params={"select_filters": json.dumps({"label": {"in": ["page-1"]}}), "limit": 1,
                             "order_by": json.dumps([{"col": "id", "dir": "desc"}])},
                     headers={"Authorization": f"Bearer {emulator.api_key}"})
    assert [x["id"] for x in r.json()["instances"]] == [ids[1]] and r.json()["next_token"] is None
    p1 = requests.get(f"{emulator.url}/api/v1/instances/", params={"limit": 2, "api_key": emulator.api_key},
                      timeout=10).json()
    assert len(p1["instances"]) == 2 and p1["next_token"] and p1["total_instances"] == 3
    assert sorted(r["id"] for r in sdk.show_instances()) == sorted(ids)
    for iid in ids:
        sdk.destroy_instance(iid)


# --------------------------------------------------------------------------------- faults --
def test_fault_stuck_loading_and_ssh_refuse(emulator, sdk, client_key):
    key, pub = client_key
    emulator.set_faults(label_prefix="stuck-", stuck_loading=True)
    emulator.set_faults(label_prefix="late-", ssh_refuse_s=1.5)
    stuck = create(sdk, pub, label="stuck-1")
    offers = sdk.search_offers(order="dph_total", limit=1)
    late = create(sdk, pub, label="late-1", offer=offers[0]["id"])
    row, _ = wait_status(sdk, late, "running")
    assert not port_open(row["ssh_port"])          # refused right after running
    ssh(row["ssh_port"], key, retry_until=5).close()  # and accepted later
    time.sleep(max(0.0, emulator.boot_seconds * 2 - 0.5))
    assert sdk.show_instance(stuck)["actual_status"] == "loading"
    assert "stall" in sdk.show_instance(stuck)["status_msg"]
    for iid in (stuck, late):
        sdk.destroy_instance(iid)


def test_fault_http_429(emulator, sdk):
    emulator.set_faults(http_429=2)
    assert sdk.show_user()["balance"]  # the SDK retries past two 429s (3 attempts)
    emulator.set_faults(http_429=3)
    with pytest.raises(requests.HTTPError) as e:
        sdk.show_user()
    assert e.value.response.status_code == 429 and e.value.response.text == "API requests too frequent"
    assert sdk.show_user()["balance"]


@pytest.mark.parametrize("mode", ["exited", "vanish"])
def test_fault_preempt(emulator, sdk, client_key, mode):
    key, pub = client_key
    iid = create(sdk, pub, label="pre-1")
    emulator.set_faults(id=iid, preempt_after_s=0.8, preempt_mode=mode)
    row, _ = wait_status(sdk, iid, "running")
    ssh(row["ssh_port"], key, retry_until=5).close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        now = sdk.show_instance(iid)
        if now is None or now["actual_status"] != "running":
            break
        time.sleep(0.05)
    assert not port_open(row["ssh_port"])
    if mode == "vanish":
        assert now is None and emulator.ledger()["instances"][0]["end_reason"] == "vanished"
    else:
        assert now["actual_status"] == "exited" and "preempt" in now["status_msg"]
        sdk.destroy_instance(iid)


def test_fault_destroy_fail_once(emulator, sdk, client_key):
    _, pub = client_key
    emulator.set_faults(label_prefix="df-err", destroy_fail_once=True)
    emulator.set_faults(label_prefix="df-silent", destroy_fail_once="silent")
    a = create(sdk, pub, label="df-err")
    b = create(sdk, pub, label="df-silent", offer=sdk.search_offers(order="dph_total", limit=1)[0]["id"])
    with pytest.raises(requests.HTTPError) as e:
        sdk.destroy_instance(a)
    assert e.value.response.status_code == 500
    assert sdk.show_instance(a) is not None
    assert sdk.destroy_instance(b)["success"] is True
    assert sdk.show_instance(b) is not None            # claimed success, still there (and billing)
    for iid in (a, b):
        assert sdk.destroy_instance(iid)["success"] is True
        assert sdk.show_instance(iid) is None


def test_fault_disk_full(emulator, sdk, client_key):
    key, pub = client_key
    emulator.set_faults(label_prefix="tiny", disk_full_mb=2)
    iid = create(sdk, pub, label="tiny-disk")
    row, _ = wait_status(sdk, iid, "running")
    c = ssh(row["ssh_port"], key, retry_until=5)
    assert run(c, "head -c 500000 /dev/zero > small && echo ok")[1].strip() == "ok"
    code, _, err = run(c, "head -c 5000000 /dev/zero > big")
    assert code != 0 and "No space left" in err
    c.close()
    sdk.destroy_instance(iid)


@pytest.mark.parametrize("mode", ["html", "missing_fields", "wrong_types", "truncated", "empty"])
def test_fault_malformed_responses(emulator, sdk, client_key, mode):
    _, pub = client_key
    iid = create(sdk, pub)
    emulator.set_faults(malformed=mode, malformed_count=1)
    if mode in ("html", "truncated", "empty"):
        with pytest.raises(requests.JSONDecodeError):
            sdk.show_instance(iid)
    else:
        row = sdk.show_instance(iid)
        if mode == "missing_fields":
            assert "ssh_port" not in row and "actual_status" not in row
        else:
            assert isinstance(row["ssh_port"], str) and isinstance(row["actual_status"], int)
    assert isinstance(sdk.show_instance(iid)["ssh_port"], int)   # one response only
    sdk.destroy_instance(iid)


def test_fault_knob_validation(emulator):
    with pytest.raises(RuntimeError, match="unknown fault knob"):
        emulator.set_faults(explode=True)
    with pytest.raises(RuntimeError, match="global"):
        emulator.set_faults(id=1, http_429=1)
    with pytest.raises(RuntimeError, match="preempt_mode"):
        emulator.set_faults(preempt_mode="sideways")
    with pytest.raises(RuntimeError, match="unknown evil mode"):
        emulator.set_faults(evil=["symlink", "polite"])
    with pytest.raises(RuntimeError, match="evil_target"):
        emulator.set_faults(evil="symlink", evil_target="relative/dir")


def test_fault_knobs_table_is_the_one_list():
    """knobs.py names every knob once: the README's table documents exactly those, and the sets,
    defaults and checks come from it."""
    from devtools.emulator import knobs

    section = (Path(__file__).parents[1] / "devtools/emulator/README.md").read_text().split("## Fault knobs")[1]
    documented = {name for row in section.split("## ")[0].splitlines() if row.startswith("| `")
                  for name in re.findall(r"`(\w+)", row.split(" | ")[0])}
    assert documented == set(knobs.KNOBS)
    assert knobs.INSTANCE_KNOBS | knobs.GLOBAL_KNOBS == set(knobs.KNOBS)
    assert not knobs.INSTANCE_KNOBS & knobs.GLOBAL_KNOBS
    assert knobs.INSTANCE_DEFAULTS == {"half_filled_s": 1.0}
    assert knobs.GLOBAL_DEFAULTS == {"http_429_retry_after": 1, "lost_create_mode": "504", "list_lag_s": 0,
                                     "foreign_rows": 0, "gone_404_after_s": 60}
    assert knobs.split({"boot_seconds": 2, "http_429": 1, "evil": None}, targeted=False) == (
        {"boot_seconds": 2, "evil": None}, {"http_429": 1})
    for body, message in [({"boot_seconds": "2"}, "boot_seconds must be a number"),
                          ({"lost_create_mode": "503"}, "lost_create_mode must be one of ('504', '500', 'drop')"),
                          ({"destroy_fail_once": "loud"}, 'destroy_fail_once must be true, "error" or "silent"'),
                          ({"garbled_fields": [1]}, "garbled_fields must be a list of row field names"),
                          ({"explode": 1}, "unknown fault knob(s) ['explode']; known: ")]:
        with pytest.raises(ValueError) as e:
            knobs.split(body, targeted=False)
        assert str(e.value).startswith(message)


def test_onstart_sees_the_image_host_keys_and_logs_come_back_over_the_api(emulator, sdk, client_key):
    """The instance's sshd host key is where an image keeps it (<image /etc>/ssh), exists before
    onstart runs, and what onstart writes to PID 1's stdout (the container's log, `/proc/1/fd/1`:
    $VAST_EMULATED_PROC/1/fd/1) comes back over the log API (request_logs -> result_url, no auth);
    onstart's own output does not (/var/log/onstart.log in SSH launch mode)."""
    key, pub = client_key
    onstart = (f"mkdir -p ~/.ssh && echo '{pub}' >> ~/.ssh/authorized_keys; echo own-output-only; "
               'cat "$VAST_EMULATED_ETC"/ssh/ssh_host_*_key.pub >> "$VAST_EMULATED_PROC/1/fd/1"')
    iid = sdk.create_instance(sdk.search_offers(query={"rented": {"eq": False}}, no_default=True)[0]["id"],
                              image="x", disk=10, label="t-keys", onstart_cmd=onstart, ssh=True, direct=True)["new_contract"]
    row, _ = wait_status(sdk, iid, "running")
    info = emulator.instance_info(iid)
    deadline = time.monotonic() + 10
    while info["host_key"] not in sdk.logs(iid, tail="100") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert info["host_key"] in sdk.logs(iid, tail="100") and "own-output-only" not in sdk.logs(iid, tail="100")
    assert "own-output-only" in (Path(info["root"]) / "var" / "log" / "onstart.log").read_text()
    c = ssh(row["ssh_port"], key, retry_until=5)
    assert c.get_transport().get_remote_server_key().get_base64() == info["host_key"].split()[1]
    c.close()
    sdk.destroy_instance(iid)


def test_fault_evil_shadows_tar_create_only(emulator, sdk, client_key):
    key, pub = client_key
    iid = create(sdk, pub)
    row, _ = wait_status(sdk, iid, "running")
    c = ssh(row["ssh_port"], key, retry_until=5)
    assert run(c, "mkdir -p d && echo hi > d/a && tar -czf - -C d . | tar -tzf - | sort")[1].split() == ["./", "./a"]
    emulator.set_faults(id=iid, evil="symlink", evil_target="/nonexistent-target")
    listing = run(c, "tar -czf - -C d --anchored . | tar -tzvf -")[1]
    assert "escape -> /nonexistent-target" in listing and "escape/pwned-symlink" in listing and "./a" in listing
    emulator.set_faults(id=iid, evil=None)
    assert run(c, "tar -czf - -C d . | tar -tzf - | sort")[1].split() == ["./", "./a"]
    c.close()
    sdk.destroy_instance(iid)


def test_stop_bills_storage_only_and_start_revives_ssh(emulator, sdk, client_key):
    key, pub = client_key
    emulator.set_faults(label_prefix="slow-boot", boot_seconds=3.0)
    slow = create(sdk, pub, label="slow-boot")
    iid = create(sdk, pub, offer=sdk.search_offers(order="dph_total", limit=1)[0]["id"])
    row, _ = wait_status(sdk, iid, "running")
    assert sdk.show_instance(slow)["actual_status"] in ("created", "loading")   # boot_seconds knob
    sdk.stop_instance(iid)
    assert sdk.show_instance(iid)["actual_status"] == "stopped" and not port_open(row["ssh_port"])
    time.sleep(1.0)
    sdk.start_instance(iid)
    row, _ = wait_status(sdk, iid, "running")
    ssh(row["ssh_port"], key, retry_until=5).close()
    entry = next(r for r in emulator.ledger()["instances"] if r["id"] == iid)
    assert entry["stopped_seconds"] >= 1.0
    assert entry["cost"] < entry["dph_total"] * entry["seconds"] / 3600
    for i in (slow, iid):
        sdk.destroy_instance(i)


# ---------------------------------------------------------------------------- persistence --
def test_restart_keeps_instances_and_revives_sshd(emulator, sdk, client_key):
    key, pub = client_key
    iid = create(sdk, pub)
    row, _ = wait_status(sdk, iid, "running")
    ssh(row["ssh_port"], key, retry_until=5).close()
    emulator.restart()                                   # graceful: sshd keeps running
    assert sdk.show_instance(iid)["actual_status"] == "running"
    ssh(row["ssh_port"], key).close()
    sshd_pid = emulator.instance_info(iid)["sshd_pid"]
    emulator.kill()                                      # crash, and the sshd dies too
    os.kill(sshd_pid, 9)
    emulator.start()
    row2 = sdk.show_instance(iid)
    assert row2["actual_status"] == "running" and emulator.instance_info(iid)["sshd_pid"] != sshd_pid
    ssh(row2["ssh_port"], key, retry_until=5).close()
    assert emulator.ledger()["instances"][0]["ended_at"] is None
    sdk.destroy_instance(iid)


def test_sshd_host_fixture_round_trip(sshd_host):
    c = ssh(sshd_host.port, sshd_host.key_path)
    assert run(c, "pwd")[1].strip() == str(sshd_host.home)
    sftp = c.open_sftp()
    sftp.putfo(io.BytesIO(b"x" * 1000), "blob")
    assert (sshd_host.home / "blob").stat().st_size == 1000
    assert c.get_transport().get_remote_server_key().get_base64() == sshd_host.host_key.split()[1]
    c.close()


# ---------------------------------------------------------------- first contact knobs (SDK level)

def test_fault_429_retry_after_and_quota(emulator):
    import requests as rq

    url = emulator.url + "/api/v0/bundles/"
    auth = {"Authorization": f"Bearer {emulator.api_key}"}
    emulator.set_faults(http_429=1, http_429_retry_after=7)
    r = rq.post(url, json={}, headers=auth, timeout=10)
    assert r.status_code == 429 and r.headers["Retry-After"] == "7" and r.text == "API requests too frequent"
    emulator.set_faults(quota_429=1)
    r = rq.post(url, json={}, headers=auth, timeout=10)
    assert r.status_code == 429 and r.json()["error"] == "search_quota_exceeded"
    assert rq.post(url, json={}, headers=auth, timeout=10).status_code == 200


def test_fault_lost_create_list_lag_null_and_destroy_lag(emulator, sdk):
    import requests as rq

    emulator.set_faults(lost_create=1, list_lag_s=1.0)
    offer = sdk.search_offers(query={}, limit=1, no_default=True)[0]
    with pytest.raises(rq.HTTPError) as e:
        sdk.create_instance(offer["id"], image="x", disk=10, label="lost-1")
    # 504, and the SDK's own retry (3 attempts) re-sent the create: 400, the offer is taken by now
    assert e.value.response.status_code in (504, 400)
    (row,) = emulator.live_instances()  # created server-side all the same
    assert sdk.show_instances() == []  # the list lags
    time.sleep(1.1)
    assert [r["label"] for r in sdk.show_instances()] == ["lost-1"]
    iid = row["id"]
    emulator.set_faults(id=iid, destroy_lag_s=1.0)
    sdk.destroy_instance(iid)
    assert sdk.show_instance(iid)["label"] == "lost-1"  # still visible
    time.sleep(1.1)
    with pytest.raises(rq.HTTPError) as e:
        sdk.show_instance(iid)
    assert e.value.response.status_code == 404
    emulator.set_faults(null_after_create_s=30, list_lag_s=0)
    iid = sdk.create_instance(offer["id"], image="x", disk=10, label="null-1")["new_contract"]
    assert sdk.show_instance(iid) is None and [r["id"] for r in sdk.show_instances()] == [iid]
    sdk.destroy_instance(iid)


def test_fault_foreign_rows_have_null_fields(emulator, sdk):
    emulator.set_faults(foreign_rows=3)
    rows = sdk.show_instances_v1({"select_filters": {}, "order_by": [{"col": "id", "dir": "asc"}], "limit": 25})
    assert len(rows["instances"]) == 3
    assert all(r["dph_total"] is None and r["ports"] is None and r["start_date"] is None for r in rows["instances"])
    assert emulator.ledger()["instances"] == []  # not ours: not billed here


# ----------------------------------------------------------- the image and the SSH session --
def test_ssh_commands_need_no_auto_tmux_and_see_a_minimal_path(emulator, sdk, client_key):
    """An onstart that only installs the key: commands fail as under Vast's auto-tmux (SFTP works),
    and once ~/.no_auto_tmux exists they run with the minimal PATH: neither the image's python nor
    the orchestrator's; nvidia-smi (the host's) prints the offer's driver and CUDA version."""
    key, pub = client_key
    offer = sdk.search_offers("num_gpus=1", order="dph_total", limit=1)[0]
    iid = create(sdk, pub, onstart=KEY_ONLY, offer=offer["id"])
    row, _ = wait_status(sdk, iid, "running")
    c = ssh(row["ssh_port"], key, retry_until=5)
    code, out, err = run(c, "echo ran")
    assert (code, out) == (1, "") and "open terminal failed: not a terminal" in err
    c.open_sftp().putfo(io.BytesIO(b""), ".no_auto_tmux")
    code, out, _ = run(c, "echo $PATH; command -v python3 python || true; nvidia-smi; nvidia-smi -L")
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("/usr/local/bin:/usr/bin:/bin:") and lines[0].endswith("/usr-bin")
    assert str(IMAGE_DIR) not in out and str(Path(sys.executable).parent) not in out
    assert f"Driver Version: {offer['driver_version']}" in out and f"CUDA Version: {offer['cuda_max_good']:.1f}" in out
    assert f"GPU 0: NVIDIA {offer['gpu_name']} (UUID:" in out
    c.close()
    sdk.destroy_instance(iid)


def test_image_python_has_a_torchvision_built_for_another_torch(emulator, sdk, client_key):
    """The image's python (on PATH through /etc/environment) is its own environment, whose torchvision
    fails on import (`image_torchvision` knob: abi by default, no_video_reader, absent)."""
    key, pub = client_key
    iid = create(sdk, pub)
    row, _ = wait_status(sdk, iid, "running")
    c = ssh(row["ssh_port"], key, retry_until=5)
    code, out, err = run(c, "python3 -c 'import sys; print(sys.prefix)'; python3 -c 'import torchvision'")
    assert out.strip() == str(IMAGE_DIR / "venv") and code == 1
    assert "RuntimeError: operator torchvision::nms does not exist" in err
    assert run(c, "python3 -c 'import yaml'")[0] == 1  # none of the orchestrator's packages
    c.close()
    sdk.destroy_instance(iid)
    emulator.set_faults(image_torchvision="no_video_reader")
    iid = create(sdk, pub)
    row, _ = wait_status(sdk, iid, "running")
    c = ssh(row["ssh_port"], key, retry_until=5)
    code, out, err = run(c, "python3 -c 'import torchvision; print(torchvision.__version__); "
                            "from torchvision.io import VideoReader'")
    assert out.strip() == "0.20.1" and code == 1 and "ImportError: cannot import name 'VideoReader'" in err
    c.close()
    sdk.destroy_instance(iid)


@pytest.mark.parametrize("faults,code,text", [
    ({"nvidia_smi": "fail"}, 9, "couldn't communicate with the NVIDIA driver"),
    ({"nvidia_smi": "absent"}, 127, "nvidia-smi: command not found"),
    ({"driver_cuda": 12.4}, 0, "Driver Version: 550.127.05     CUDA Version: 12.4")])
def test_fault_nvidia_smi(emulator, sdk, client_key, faults, code, text):
    key, pub = client_key
    emulator.set_faults(**faults)
    iid = create(sdk, pub)
    row, _ = wait_status(sdk, iid, "running")
    c = ssh(row["ssh_port"], key, retry_until=5)
    got, out, err = run(c, "nvidia-smi")
    assert got == code and text in out + err
    c.close()
    sdk.destroy_instance(iid)


def test_half_filled_rows_by_default(emulator):
    """A new instance's row (show and list) has start_date, dph_total and ports null for
    `half_filled_s` (default 1 s), as Vast's rows of instances being created do: the SDK's own
    show_instance dies on it (it computes time.time() - start_date). `garbled_fields` garbles one row."""
    sdk = VastAI(api_key=emulator.api_key, server_url=emulator.url)
    offer = sdk.search_offers(query={"rented": {"eq": False}}, no_default=True)[0]["id"]
    iid = sdk.create_instance(offer, image="x", disk=10, label="half-1")["new_contract"]
    params = {"select_filters": {}, "order_by": [{"col": "id", "dir": "asc"}], "limit": 25}
    raw = requests.get(f"{emulator.url}/api/v0/instances/{iid}/", params={"api_key": emulator.api_key}, timeout=10)
    (listed,) = sdk.show_instances_v1(params)["instances"]
    for row in (raw.json()["instances"], listed):
        assert row["start_date"] is None and row["dph_total"] is None and row["ports"] is None
        assert row["label"] == "half-1" and row["ssh_port"]
    with pytest.raises(TypeError):
        sdk.show_instance(iid)
    time.sleep(1.1)
    row = sdk.show_instance(iid)
    assert row["start_date"] and row["dph_total"] > 0 and row["ports"]["22/tcp"]
    emulator.set_faults(id=iid, garbled_fields=["dph_total"])
    assert sdk.show_instance(iid)["dph_total"] == "cheap"
    with pytest.raises(RuntimeError, match="garbled_fields"):
        emulator.set_faults(garbled_fields="dph_total")
    sdk.destroy_instance(iid)
