"""The real `vastai` CLI (subprocess, unchanged) against the emulator."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

VASTAI = str(Path(sys.executable).parent / "vastai")


def cli(emulator, *args, key=None, check=True):
    env = dict(os.environ, VASTAI_NO_UPDATE_CHECK="1", HOME=str(emulator.state_dir))
    env.pop("VAST_API_KEY", None)
    r = subprocess.run([VASTAI, "--url", emulator.url, "--api-key", key or emulator.api_key, *args],
                       capture_output=True, text=True, env=env, timeout=60)
    if check:
        assert r.returncode == 0, f"vastai {' '.join(args)} -> {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def test_cli_search_create_show_label_logs_destroy(emulator):
    offers = json.loads(cli(emulator, "search", "offers", "gpu_ram>=40 num_gpus=1", "-o", "dph_total", "--raw").stdout)
    assert offers and all(o["gpu_ram"] >= 40000 and o["num_gpus"] == 1 for o in offers)
    assert [o["dph_total"] for o in offers] == sorted(o["dph_total"] for o in offers)
    table = cli(emulator, "search", "offers", "gpu_name=H100_SXM").stdout
    assert "H100_SXM" in table and "RTX_4090" not in table

    created = json.loads(cli(emulator, "create", "instance", str(offers[0]["id"]), "--image", "pytorch/pytorch",
                             "--disk", "20", "--ssh", "--direct", "--label", "cli-run",
                             "--onstart-cmd", "echo hello-from-onstart", "--raw").stdout)
    assert created["success"] is True
    iid = created["new_contract"]
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        # while its row is half-filled (start_date null) the real CLI itself fails, as on Vast.ai
        r = cli(emulator, "show", "instances", "--raw", check=False)
        if r.returncode != 0:
            assert "start_date" in r.stderr or "NoneType" in r.stderr, r.stderr
            continue
        (row,) = json.loads(r.stdout)
        if row["actual_status"] == "running" and row["start_date"] is not None:
            break
    assert row["id"] == iid and row["actual_status"] == "running" and row["label"] == "cli-run"
    assert row["ssh_host"] == "127.0.0.1" and row["gpu_name"] == offers[0]["gpu_name"]

    assert "renamed" in cli(emulator, "label", "instance", str(iid), "renamed").stdout
    # the log API serves the container's log: onstart's own output is in /var/log/onstart.log only
    assert "hello-from-onstart" not in cli(emulator, "logs", str(iid)).stdout
    assert "hello-from-onstart" in (Path(emulator.instance_info(iid)["root"]) / "var/log/onstart.log").read_text()
    assert f"destroying instance {iid}" in cli(emulator, "destroy", "instance", str(iid), "-y").stdout
    assert json.loads(cli(emulator, "show", "instance", str(iid), "--raw").stdout) == {"instances": None}
    (entry,) = emulator.ledger()["instances"]
    assert entry["label"] == "renamed" and entry["end_reason"] == "destroyed" and entry["cost"] > 0


def test_cli_wrong_key_reports_401(emulator):
    r = cli(emulator, "show", "instances", "--raw", key="wrong-key", check=False)
    err = json.loads(r.stderr.strip().splitlines()[-1])
    assert err["status_code"] == 401 and err["msg"] == "Invalid user key"
