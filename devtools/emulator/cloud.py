"""The emulated cloud: instances with a lifecycle, real sshd, billing and fault knobs.

Lifecycle: created -> loading (after boot/4) -> running (after boot). On `running` the onstart
script starts (bash -c, cwd = HOME = disk) and the instance's sshd starts (unless delayed by a
fault). Billing: dph_total per second from creation until destroy (storage-only while stopped), and
the SSH bytes each way at the offer's inet_up_cost / inet_down_cost per GB (counted by a relay in front
of each sshd: meter.py).
Rows of instances being created are half-filled (`half_filled_s`, default 1 s: start_date, dph_total
and ports null). The log API serves the container's log (PID 1's stdout: `<root>/proc/1/fd/1`, the
sshd log, a status line), not onstart's output, which goes to `<root>/var/log/onstart.log` as in
Vast's SSH launch mode (docs/REFERENCE.md section 1b).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Optional

from devtools.emulator import offers as catalogue
from devtools.emulator import evil, image, knobs
from devtools.emulator.knobs import GLOBAL_COUNTERS, GLOBAL_DEFAULTS, GLOBAL_SETTINGS, INSTANCE_DEFAULTS, INSTANCE_KNOBS
from devtools.emulator.knobs import GLOBAL_KNOBS  # noqa: F401 - benchmarks/chaos.py imports it from here
from devtools.emulator.meter import Meter
from devtools.emulator.sshd import ETC_VAR, PROC_VAR, ROOT_MARKER, Sshd, SshdError, free_port, kill_instance_processes
from devtools.emulator.state import Store

class ApiError(Exception):
    """An error answered as Vast does: HTTP status + {"success": false, "error", "msg"}."""

    def __init__(self, status: int, error: str, msg: str):
        super().__init__(msg)
        self.status, self.error, self.msg = status, error, msg


class Cloud:
    def __init__(self, state_dir: Path, boot_seconds: float = 3.0, credit: float = 50.0):
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.state_dir / "emulator.sqlite3")
        self.lock = self.store.lock
        self.boot_seconds = boot_seconds
        if self.store.get_meta("credit") is None:
            self.store.set_meta("credit", credit)
            self.store.set_meta("credit_at", time.time())
        self._procs: dict[int, subprocess.Popen] = {}
        self._meters: dict[int, Meter] = {}  # instance id -> the relay counting its SSH bytes
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # ---------------------------------------------------------------- background lifecycle --
    def start(self) -> None:
        image.image_env()  # build the cached image now, not in the first instance's boot
        self.recover()
        self._thread = threading.Thread(target=self._loop, name="lifecycle", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.1):
            try:
                self.tick()
            except Exception as e:  # noqa: BLE001 - keep the cloud alive, log the bug
                print(f"lifecycle tick failed: {e!r}", flush=True)

    def shutdown(self, kill_instances: bool = True) -> None:
        """Stop the lifecycle thread; with kill_instances, kill every sshd and onstart we started."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        if kill_instances:
            with self.lock:
                for inst in self.store.instances():
                    self._kill(inst)
                    self._unmount(inst)  # a disk_full tmpfs loses its content here
                    inst["ssh_started"] = False
                    self.store.put_instance(inst)

    def recover(self) -> None:
        """After a restart: bring back the sshd of every running instance whose sshd is gone."""
        with self.lock:
            for inst in self.store.instances():
                if inst["status"] == "running" and inst.get("ssh_started"):
                    sshd = self._sshd(inst)
                    sshd.pid = inst.get("sshd_pid")
                    if not sshd.alive():
                        self._start_sshd(inst)
                    elif inst["id"] not in self._meters:
                        self._start_meter(inst)
                    self.store.put_instance(inst)

    def tick(self) -> None:
        now = time.time()
        with self.lock:
            for inst in self.store.instances():
                before = json.dumps(inst, sort_keys=True)
                if inst["id"] in self._meters:  # kept in the store: a restarted emulator goes on counting
                    inst["bytes_up"], inst["bytes_down"] = self._meters[inst["id"]].counts()
                self._advance(inst, now)
                if json.dumps(inst, sort_keys=True) != before:
                    self.store.put_instance(inst)
            for pid, proc in list(self._procs.items()):
                if proc.poll() is not None:
                    del self._procs[pid]

    def _advance(self, inst: dict, now: float) -> None:
        f = self.faults_for(inst)
        boot = float(f.get("boot_seconds", self.boot_seconds))
        age = now - inst["created_at"]
        if inst["status"] == "created" and age >= boot / 4:
            inst["status"], inst["status_msg"] = "loading", f"Pulling {inst['image'] or 'image'}..."
        if inst["status"] == "loading" and age >= boot:
            if f.get("stuck_loading"):
                inst["status_msg"] = "Still pulling image layers (stalled)"
                return
            inst["status"], inst["status_msg"], inst["running_at"] = "running", "success, running", now
            self._start_onstart(inst)
        if inst["status"] != "running":
            return
        if not inst.get("ssh_started") and now >= inst["running_at"] + float(f.get("ssh_refuse_s", 0) or 0):
            self._start_sshd(inst)
        preempt = f.get("preempt_after_s")
        if preempt is not None and now >= inst["running_at"] + float(preempt):
            self._preempt(inst, f.get("preempt_mode", "exited"), now)
            if f.get("host_reclaims"):  # the host gave the machine to another tenant: its offer is gone
                self.store.set_meta("reclaimed_offers", sorted({*self.store.get_meta("reclaimed_offers", []),
                                                                inst["offer_id"]}))

    def _preempt(self, inst: dict, mode: str, now: float) -> None:
        self._kill(inst)
        inst["preempted_at"] = now
        if mode == "vanish":
            inst["ended_at"], inst["end_reason"] = now, "vanished"
            self._remove_disk(inst)
        elif mode == "stopped":  # outbid (interruptible): stopped, the disk kept, storage still bills
            inst.update(status="stopped", status_msg="Instance stopped: outbid by a higher bid", stopped_since=now,
                        ssh_started=False, outbid=True)
        else:
            inst["status"] = mode
            inst["status_msg"] = "Host went offline: instance preempted" if mode == "offline" else \
                "Instance exited: preempted by the host (outbid or maintenance)"

    # ------------------------------------------------------------------- processes & disk --
    def _sshd(self, inst: dict) -> Sshd:
        """The instance's sshd, on its own port behind the byte-counting relay on `ssh_port`."""
        return Sshd(Path(inst["root"]), int(inst.get("sshd_port") or inst["ssh_port"]), inst.get("sshd_pid"))

    def _start_meter(self, inst: dict) -> None:
        """The relay on the advertised ssh_port that counts the instance's bytes (meter.py)."""
        self._stop_meter(inst)
        try:
            meter = Meter(int(inst["ssh_port"]), int(inst["sshd_port"]), inst.get("bytes_up", 0), inst.get("bytes_down", 0))
        except OSError:  # port taken since creation (e.g. after a restart): take another
            inst["ssh_port"] = free_port()
            meter = Meter(int(inst["ssh_port"]), int(inst["sshd_port"]), inst.get("bytes_up", 0), inst.get("bytes_down", 0))
        self._meters[inst["id"]] = meter

    def _stop_meter(self, inst: dict) -> None:
        meter = self._meters.pop(inst["id"], None)
        if meter is not None:
            meter.close()
            inst["bytes_up"], inst["bytes_down"] = meter.counts()

    def _env(self, inst: dict) -> dict:
        return {k: str(v) for k, v in inst["env"].items() if k.isidentifier()} | {
            "CONTAINER_ID": str(inst["id"]), "VAST_CONTAINERLABEL": f"C.{inst['id']}"}

    def _install_host(self, inst: dict) -> None:
        """What the host puts in the container: its nvidia-smi (root/usr-bin), per the `nvidia_smi` knob."""
        o, f = inst["offer"], self.faults_for(inst)
        image.install_nvidia_smi(Path(inst["root"]) / "usr-bin", o["gpu_name"], o["num_gpus"], o["driver_version"],
                                 float(o["cuda_max_good"]), f.get("nvidia_smi") or "ok", f.get("driver_cuda"))

    def _start_sshd(self, inst: dict) -> None:
        self._sync_evil(inst)
        self._install_host(inst)
        inst["sshd_port"] = free_port()
        sshd = self._sshd(inst)
        sshd.prepare(self._env(inst), instance=True)
        try:
            sshd.start()
        except SshdError:  # port taken since it was picked: take another
            inst["sshd_port"] = free_port()
            sshd = self._sshd(inst)
            sshd.prepare(self._env(inst), instance=True)
            sshd.start()
        inst["sshd_pid"], inst["ssh_started"] = sshd.pid, True
        self._start_meter(inst)

    def _start_onstart(self, inst: dict) -> None:
        disk = Path(inst["root"]) / "disk"
        disk.mkdir(parents=True, exist_ok=True)
        # the image's sshd host keys exist before onstart runs (it prints their fingerprints), as on
        # Vast.ai, where the container's entrypoint makes them before onstart
        self._sshd(inst).prepare(self._env(inst), instance=True)
        self._install_host(inst)
        # SSH launch mode: onstart's output goes to /var/log/onstart.log, not to the container's log
        # (PID 1's stdout, what the log API serves); a process that wants to reach that log writes
        # to /proc/1/fd/1, here `$VAST_EMULATED_PROC/1/fd/1`
        (Path(inst["root"]) / "var" / "log").mkdir(parents=True, exist_ok=True)
        self._container_log(inst).touch()
        log = open(Path(inst["root"]) / "var" / "log" / "onstart.log", "ab")
        if not inst.get("onstart"):
            log.write(b"(no onstart script)\n")
            log.close()
            return
        # onstart sees the image's container environment (image.py: its python first on PATH, the
        # shared package caches and index settings) and the instance's env; SSH sessions see neither
        # unless onstart writes them to $VAST_EMULATED_ETC/environment
        tv = self.faults_for(inst).get("image_torchvision") or "abi"
        env = {"HOME": str(disk), **image.image_env(tv), "VAST_EMULATED": "1", ROOT_MARKER: inst["root"],
               ETC_VAR: str(Path(inst["root"]) / "etc"), PROC_VAR: str(Path(inst["root"]) / "proc"),
               "LANG": "C.UTF-8", **self._env(inst)}
        proc = subprocess.Popen(["/bin/bash", "-c", inst["onstart"]], cwd=disk, env=env, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._procs[proc.pid] = proc
        inst["onstart_pid"] = proc.pid

    @staticmethod
    def _container_log(inst: dict) -> Path:
        """The container's stdout (PID 1's): what the log API serves."""
        path = Path(inst["root"]) / "proc" / "1" / "fd" / "1"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _kill(self, inst: dict) -> None:
        self._stop_meter(inst)
        sshd = self._sshd(inst)
        sshd.pid = inst.get("sshd_pid")
        sshd.stop()
        kill_instance_processes(Path(inst["root"]))
        inst["sshd_pid"] = None

    def _unmount(self, inst: dict) -> None:
        if inst.get("disk_mounted"):
            subprocess.run(["umount", "-l", str(Path(inst["root"]) / "disk")], capture_output=True)
            inst["disk_mounted"] = False

    def _remove_disk(self, inst: dict) -> None:
        self._unmount(inst)
        shutil.rmtree(inst["root"], ignore_errors=True)

    def _mount_small_disk(self, inst: dict, size_mb: float) -> None:
        """disk_full_mb: the disk is a tmpfs of that size, so writes past it fail with ENOSPC."""
        disk = Path(inst["root"]) / "disk"
        disk.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={max(1, int(size_mb * 1024))}k,mode=755",
                            "tmpfs", str(disk)], capture_output=True, text=True)
        if r.returncode != 0:
            raise ApiError(500, "emulator_error", f"disk_full_mb needs root and mount rights: {r.stderr.strip()}")
        inst["disk_mounted"] = True

    def _sync_evil(self, inst: dict) -> None:
        """Install (or remove) the `evil` knob's shadowing commands for this instance (evil.py)."""
        f = self.faults_for(inst)
        evil.install(Path(inst["root"]), f.get("evil"), f.get("evil_target"))

    # ------------------------------------------------------------------------------ faults --
    def faults_for(self, inst: dict) -> dict:
        """Knobs for one instance: global '*' rule, then label-prefix rules, then its id rule."""
        rules = self.store.rules()
        merged = {**INSTANCE_DEFAULTS, **rules.get("*", {})}
        label = inst.get("label") or ""
        for sel in sorted(s for s in rules if s.startswith("label:")):
            if label.startswith(sel[len("label:"):]):
                merged.update(rules[sel])
        merged.update(rules.get(f"id:{inst['id']}", {}))
        return {k: v for k, v in merged.items() if k in INSTANCE_KNOBS}

    def set_faults(self, body: dict) -> dict:
        """POST /_emulator/faults: {"clear": true} | {[id|label_prefix], knob: value, ...}."""
        if not isinstance(body, dict):
            raise ApiError(400, "invalid_args", "faults body must be a JSON object")
        body = dict(body)
        with self.lock:
            if body.pop("clear", False):
                self.store.clear_rules()
                for key in ("malformed_count", *GLOBAL_COUNTERS):
                    self.store.set_meta(key, 0)
                for key, value in GLOBAL_DEFAULTS.items():
                    self.store.set_meta(key, value)
                self.store.set_meta("reclaimed_offers", [])
            target_id, prefix = body.pop("id", None), body.pop("label_prefix", None)
            try:
                body, global_part = knobs.split(body, targeted=target_id is not None or prefix is not None)
            except ValueError as e:
                raise ApiError(400, "invalid_args", str(e)) from None
            for key in GLOBAL_COUNTERS:
                if key in global_part:
                    self.store.set_meta(key, int(global_part[key]))
            for key in GLOBAL_SETTINGS:
                if key in global_part:
                    value = global_part[key]
                    self.store.set_meta(key, GLOBAL_DEFAULTS[key] if value is None else value)
            if "malformed" in global_part:
                for key, value in knobs.malformed_armed(global_part).items():
                    self.store.set_meta(key, value)
            if body:
                sel = f"id:{int(target_id)}" if target_id is not None else (
                    f"label:{prefix}" if prefix is not None else "*")
                self.store.set_rule(sel, body)
            for inst in self.store.instances():  # `evil` takes effect at once on live instances
                if Path(inst["root"]).is_dir():
                    self._sync_evil(inst)
            return self.faults_view()

    def setting(self, key: str) -> Any:
        return self.store.get_meta(key, GLOBAL_DEFAULTS.get(key))

    def faults_view(self) -> dict:
        return {"rules": self.store.rules(), **{k: self.store.get_meta(k, 0) for k in GLOBAL_COUNTERS},
                **{k: self.setting(k) for k in GLOBAL_SETTINGS},
                "malformed": self.store.get_meta("malformed"),
                "malformed_count": self.store.get_meta("malformed_count", 0)}

    # ------------------------------------------------------------------------ operations --
    def rented_offer_ids(self) -> set[int]:
        return {i["offer_id"] for i in self.store.instances()} | set(self.store.get_meta("reclaimed_offers", []))

    def search(self, query: dict) -> list[dict]:
        try:
            return catalogue.search(query, self.rented_offer_ids())
        except catalogue.QueryError as e:
            raise ApiError(400, "invalid_args", str(e)) from None

    def create(self, offer_id: int, body: dict) -> dict:
        if not isinstance(body, dict):
            raise ApiError(400, "invalid_args", "body must be a JSON object")
        offer = next((o for o in catalogue.catalogue() if o["id"] == offer_id), None)
        if offer is None:
            raise ApiError(404, "no_such_ask", f"Offer {offer_id} does not exist.")
        env = body.get("env") or {}
        if not isinstance(env, dict):
            raise ApiError(400, "invalid_args", "env must be an object of name: value")
        try:
            disk_gb = float(body.get("disk") or 10)
        except (TypeError, ValueError):
            raise ApiError(400, "invalid_args", "disk must be a number of GB") from None
        if disk_gb > offer["disk_space"]:
            raise ApiError(400, "invalid_args", f"disk {disk_gb} GB exceeds the offer's {offer['disk_space']} GB")
        bid = body.get("price")
        with self.lock:
            if offer_id in self.rented_offer_ids():
                raise ApiError(400, "no_such_ask", f"Offer {offer_id} is no longer available (already rented).")
            iid = self.store.next_instance_id()
            priced = catalogue.price(offer, disk_gb, bid=bid is not None)
            if bid is not None:
                if float(bid) < offer["min_bid"]:
                    raise ApiError(400, "invalid_args", f"bid {bid} is below min_bid {offer['min_bid']}")
                priced["dph_total"] = round(float(bid) + priced["storage_total_cost"], 6)
            root = self.state_dir / "instances" / str(iid)
            now = time.time()
            inst = {
                "id": iid, "offer_id": offer_id, "offer": priced, "label": body.get("label"),
                "image": body.get("image"), "disk_gb": disk_gb, "onstart": body.get("onstart"),
                "env": {str(k): v for k, v in env.items()}, "runtype": body.get("runtype") or "ssh",
                "bid_price": bid, "dph_total": priced["dph_total"], "storage_dph": priced["storage_total_cost"],
                "created_at": now, "running_at": None, "ended_at": None, "end_reason": None,
                "status": "created", "status_msg": "Instance created", "ssh_port": free_port(),
                "root": str(root), "stopped_since": None, "stopped_seconds": 0.0, "extra_ports": {},
            }
            for key in inst["env"]:
                if key.startswith("-p "):
                    inst["extra_ports"][key[3:].split(":")[-1]] = free_port()
            root.mkdir(parents=True, exist_ok=True)
            size = self.faults_for(inst).get("disk_full_mb")
            if size:
                self._mount_small_disk(inst, float(size))
            self.store.put_instance(inst)
        return {"success": True, "new_contract": iid, "instance_api_key": None}

    def _live(self, instance_id: int) -> dict:
        inst = self.store.get_instance(instance_id)
        if inst is None or inst.get("ended_at") is not None:
            raise ApiError(404, "no_such_instance", f"Instance {instance_id} not found.")
        return inst

    def destroy(self, instance_id: int) -> dict:
        with self.lock:
            gone = self.store.get_instance(instance_id)
            if gone is not None and gone.get("ended_at") is not None and time.time() < gone.get("visible_until", 0):
                return {"success": True, "msg": "already destroying"}  # a repeated DELETE during the lag
            inst = self._live(instance_id)
            mode = self.faults_for(inst).get("destroy_fail_once")
            if mode and not inst.get("destroy_failed"):
                inst["destroy_failed"] = True
                self.store.put_instance(inst)
                if mode == "silent":
                    return {"success": True, "msg": "destroying instance"}
                raise ApiError(500, "server_error", "Internal error while destroying the instance; try again.")
            self._kill(inst)
            self._remove_disk(inst)
            self._end_stop(inst, time.time())
            lag = float(self.faults_for(inst).get("destroy_lag_s") or 0)
            if lag:  # the row stays visible (show, list) for `lag` s, then show answers 404
                inst["visible_until"], inst["last_row"] = time.time() + lag, self.instance_row(inst)
            inst["ended_at"], inst["end_reason"], inst["status"] = time.time(), "destroyed", "destroyed"
            self.store.put_instance(inst)
        return {"success": True}

    # ------------------------------------------------------------------ what the API shows --
    def show(self, instance_id: int) -> Optional[dict]:
        """GET /instances/{id}/: the row; None ({"instances": null}) for a destroyed instance (and for
        `null_after_create_s` after creation); a 404 once it is long gone (`gone_404_after_s`, or at
        once after a `destroy_lag_s`), as Vast does."""
        inst = self.store.get_instance(instance_id)
        if inst is None:
            return None
        now = time.time()
        if inst.get("ended_at") is not None:
            if now < inst.get("visible_until", 0):
                return self._destroying_row(inst)
            if inst.get("visible_until") or now - inst["ended_at"] >= float(self.setting("gone_404_after_s")):
                raise ApiError(404, "no_such_instance", f"Instance {instance_id} not found.")
            return None
        if now - inst["created_at"] < float(self.faults_for(inst).get("null_after_create_s") or 0):
            return None
        return self.instance_row(inst)

    @staticmethod
    def _destroying_row(inst: dict) -> dict:
        row = dict(inst["last_row"])
        row.update(intended_status="stopped", next_state="unloaded", status_msg="Destroying instance...")
        return row

    def list_rows(self) -> list[dict]:
        """The account's instances as the list endpoints show them: `list_lag_s` hides the newest,
        `destroy_lag_s` keeps destroyed ones a while, `foreign_rows` adds other projects' rows with
        null fields."""
        now = time.time()
        lag = float(self.setting("list_lag_s") or 0)
        rows = []
        for inst in self.store.instances(include_ended=True):
            if inst.get("ended_at") is None:
                if now - inst["created_at"] >= lag:
                    rows.append(self.instance_row(inst))
            elif now < inst.get("visible_until", 0):
                rows.append(self._destroying_row(inst))
        return rows + self.foreign_rows(int(self.setting("foreign_rows") or 0))

    @staticmethod
    def foreign_rows(n: int) -> list[dict]:
        """Other instances in the account (another project's, one unlabelled), half-filled as rows of
        instances being created or migrated are: dph_total, ports, start_date, ssh_port null."""
        out = []
        for i in range(n):
            out.append({"id": 9_000_001 + i, "machine_id": None, "actual_status": "loading" if i % 2 else None,
                        "intended_status": "running", "cur_state": "running", "next_state": "running",
                        "status_msg": None, "label": None if i % 3 == 2 else f"other-project-{i}",
                        "gpu_name": None, "num_gpus": None, "ssh_host": None, "ssh_port": None,
                        "public_ipaddr": None, "ports": None, "start_date": None, "end_date": None,
                        "dph_total": None, "extra_env": [], "image_uuid": "someone/else:latest"})
        return out

    def update(self, instance_id: int, body: dict) -> dict:
        """PUT /instances/{id}/: {"label": ...} or {"state": "stopped"|"running"}."""
        if not isinstance(body, dict):
            raise ApiError(400, "invalid_args", "body must be a JSON object")
        with self.lock:
            inst = self._live(instance_id)
            if "label" in body:
                inst["label"] = body["label"]
            state = body.get("state")
            now = time.time()
            if state == "stopped" and inst["status"] != "stopped":
                self._kill(inst)
                inst.update(status="stopped", status_msg="stopped by user", stopped_since=now, ssh_started=False)
            elif state == "running" and inst["status"] == "stopped":
                self._end_stop(inst, now)
                inst.update(status="running", status_msg="success, running", running_at=now, ssh_started=False)
                self._start_onstart(inst)
            elif state not in (None, "stopped", "running"):
                raise ApiError(400, "invalid_args", f"state must be stopped or running, got {state!r}")
            self.store.put_instance(inst)
        return {"success": True}

    @staticmethod
    def _end_stop(inst: dict, now: float) -> None:
        if inst.get("stopped_since"):
            inst["stopped_seconds"] += now - inst["stopped_since"]
            inst["stopped_since"] = None

    def attach_ssh(self, instance_id: int, body: dict) -> dict:
        key = body.get("ssh_key") if isinstance(body, dict) else None
        if not isinstance(key, str) or not key.strip().startswith(("ssh-", "ecdsa-", "sk-")):
            raise ApiError(400, "invalid_args", "ssh_key must be an OpenSSH public key line ('ssh-ed25519 AAAA...')")
        with self.lock:
            inst = self._live(instance_id)
            Sshd(Path(inst["root"]), int(inst["ssh_port"])).authorize(key)
        return {"success": True, "msg": "SSH key attached"}

    def logs(self, instance_id: int, tail: Any) -> str:
        inst = self.store.get_instance(instance_id)
        if inst is None:
            raise ApiError(404, "no_such_instance", f"Instance {instance_id} not found.")
        try:
            n = int(tail) if tail else 1000
        except (TypeError, ValueError):
            raise ApiError(400, "invalid_args", f"tail must be a number of lines, got {tail!r}") from None
        lines = []  # the container's log: PID 1's stdout (never onstart's own output), then sshd's
        for path in (Path(inst["root"]) / "proc" / "1" / "fd" / "1", Path(inst["root"]) / "sshd.log"):
            try:
                lines += path.read_text(errors="replace").splitlines()
            except OSError:
                pass
        lines.append(f"[emulator] instance {instance_id} status={inst['status']} msg={inst.get('status_msg')}")
        return "\n".join(lines[-n:]) + "\n"

    # ----------------------------------------------------------------------------- views --
    def instance_row(self, inst: dict) -> dict:
        """The instance as Vast's API shows it; half-filled (start_date, dph_total, ports null) for
        `half_filled_s` after creation, as rows of instances being created are."""
        row, f = self._full_row(inst), self.faults_for(inst)
        if time.time() - inst["created_at"] < float(f.get("half_filled_s") or 0):
            row.update(start_date=None, dph_total=None, ports=None)
        if f.get("garbled_fields"):  # this one row (show and list) with wrong-typed values
            from devtools.emulator.server import WRONG_TYPES

            row.update({k: WRONG_TYPES.get(k, "garbage") for k in f["garbled_fields"]})
        return row

    def _full_row(self, inst: dict) -> dict:
        o, now = inst["offer"], time.time()
        status = inst["status"]
        ports = {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(inst["ssh_port"])}]}
        for cport, hport in inst.get("extra_ports", {}).items():
            ports[cport if "/" in cport else f"{cport}/tcp"] = [{"HostIp": "0.0.0.0", "HostPort": str(hport)}]
        stopped = status == "stopped"
        return {
            "id": inst["id"], "machine_id": o["machine_id"], "host_id": o["host_id"], "bundle_id": o["id"],
            "actual_status": status,
            "intended_status": "stopped" if stopped and not inst.get("outbid") else "running",
            "cur_state": "stopped" if stopped else "running", "next_state": "stopped" if stopped else "running",
            "status_msg": inst.get("status_msg"), "label": inst.get("label"),
            "image_uuid": inst.get("image"), "image_runtype": inst.get("runtype"), "image_args": [],
            "onstart": inst.get("onstart"), "template_id": None, "template_hash_id": None,
            "gpu_name": o["gpu_name"], "num_gpus": o["num_gpus"], "gpu_ram": o["gpu_ram"],
            "gpu_totalram": o["gpu_total_ram"], "gpu_util": 0.0, "gpu_temp": 35.0, "cpu_name": o["cpu_name"],
            "cpu_ram": o["cpu_ram"], "cpu_cores": o["cpu_cores"], "cpu_cores_effective": o["cpu_cores_effective"],
            "disk_space": inst["disk_gb"], "disk_usage": 0.0, "disk_util": 0.0,
            "ssh_host": "127.0.0.1", "ssh_port": int(inst["ssh_port"]), "ssh_idx": "0",
            "public_ipaddr": "127.0.0.1", "local_ipaddrs": "127.0.0.1", "ports": ports,
            "direct_port_start": int(inst["ssh_port"]), "direct_port_end": int(inst["ssh_port"]),
            "start_date": inst["created_at"], "end_date": inst["created_at"] + o["duration"],
            "uptime_mins": round((now - (inst.get("running_at") or now)) / 60, 2) if status == "running" else None,
            "dph_total": inst["dph_total"], "dph_base": o["dph_base"], "storage_cost": o["storage_cost"],
            "storage_total_cost": inst["storage_dph"], "inet_up": o["inet_up"], "inet_down": o["inet_down"],
            "inet_up_cost": o["inet_up_cost"], "inet_down_cost": o["inet_down_cost"], "min_bid": o["min_bid"],
            "is_bid": inst.get("bid_price") is not None, "reliability2": o["reliability2"],
            "cuda_max_good": o["cuda_max_good"], "driver_version": o["driver_version"],
            "geolocation": o["geolocation"], "verification": o["verification"], "hosting_type": o["hosting_type"],
            "extra_env": [[k, str(v)] for k, v in inst["env"].items()], "jupyter_token": None,
            "time_remaining": "", "logo": "/static/logos/nvidia.png",
        }

    def bandwidth(self, inst: dict) -> tuple[int, int]:
        """(bytes up, bytes down) of the instance's SSH traffic, counted by its relay (meter.py): up
        leaves the instance (billed at inet_up_cost), down reaches it (inet_down_cost)."""
        meter = self._meters.get(inst["id"])
        if meter is not None:
            return meter.counts()
        return int(inst.get("bytes_up", 0)), int(inst.get("bytes_down", 0))

    def ledger(self) -> dict:
        now, rows = time.time(), []
        for inst in self.store.instances(include_ended=True):
            end = inst["ended_at"] or now
            stopped = inst.get("stopped_seconds", 0.0) + (now - inst["stopped_since"] if inst.get("stopped_since")
                                                            and not inst["ended_at"] else 0.0)
            seconds = max(0.0, end - inst["created_at"])
            cost = inst["dph_total"] * seconds / 3600 - (inst["dph_total"] - inst["storage_dph"]) * stopped / 3600
            up, down = self.bandwidth(inst)
            bandwidth = up / 1e9 * inst["offer"]["inet_up_cost"] + down / 1e9 * inst["offer"]["inet_down_cost"]
            cost += bandwidth
            rows.append({"id": inst["id"], "label": inst.get("label"), "offer_id": inst["offer_id"],
                         "gpu_name": inst["offer"]["gpu_name"], "num_gpus": inst["offer"]["num_gpus"],
                         "dph_total": inst["dph_total"], "created_at": inst["created_at"], "running_at": inst.get("running_at"),
                         "ended_at": inst["ended_at"], "end_reason": inst.get("end_reason"),
                         "status": inst["status"], "seconds": round(seconds, 6),
                         "stopped_seconds": round(stopped, 3), "bytes_up": up, "bytes_down": down,
                         "bandwidth_cost": round(bandwidth, 10), "cost": round(cost, 10)})
        total = sum(r["cost"] for r in rows)
        credit = float(self.store.get_meta("credit", 0.0))
        return {"instances": rows, "total_cost": round(total, 8), "credit": credit,
                "balance": round(credit - total, 8), "now": now}

    def admin_info(self, instance_id: int) -> dict:
        inst = self.store.get_instance(instance_id)
        if inst is None:
            raise ApiError(404, "no_such_instance", f"Instance {instance_id} not found.")
        root = Path(inst["root"])
        key_pub = root / "etc" / "ssh" / "ssh_host_ed25519_key.pub"
        return {"id": inst["id"], "status": inst["status"], "root": str(root), "disk": str(root / "disk"),
                "ssh_port": inst["ssh_port"], "sshd_pid": inst.get("sshd_pid"),
                "onstart_pid": inst.get("onstart_pid"), "ended_at": inst["ended_at"],
                "host_key": " ".join(key_pub.read_text().split()[:2]) if key_pub.exists() else None,
                "faults": self.faults_for(inst), "destroy_failed": bool(inst.get("destroy_failed"))}
