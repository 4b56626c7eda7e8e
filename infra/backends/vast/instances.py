"""Renting a Vast.ai instance: launch (the cheapest run's offer, created once, waited for, its host
keys read, checked ready; a failed start destroyed and the next offer tried), and the account's
`VastProvider` that tests and the backend use: the API calls (api.py), the market (offers.py) and this."""
from __future__ import annotations

import time
from typing import Callable, Optional

from contract.machine_config import MachineConfig, TrainWorkload

from ...machines.machine import FailedStart, Lease
from .api import NoOffersError, ProvisionError, SearchQuotaExceeded, VastAPIError
from . import hostkeys
from .hostkeys import HOSTKEY_MARK, HOSTKEY_WAIT_S, parse_host_keys, ssh_endpoint, ssh_endpoints
from .offers import VastOffers

# `stopped`/`frozen`: an outbid interruptible instance is stopped (storage still bills): failed at
# start, lost when running (docs/REFERENCE.md section 1b).
FAILED_STATES = {"exited", "unknown", "offline", "stopped", "frozen"}
# Fields a row of an instance being created shows null (docs/REFERENCE.md section 1b): not ready yet.
HALF_FILLED = ("start_date", "dph_total", "ports")


class VastProvider(VastOffers):
    """One Vast.ai account: its API calls, offers and instances."""

    # how long to look (by label) for an instance a create may have made when its answer was lost
    create_settle_s = 60.0
    hostkey_wait_s = HOSTKEY_WAIT_S

    def wait_host_keys(self, instance_id: int, timeout_s: float) -> list[str]:
        """The host key fingerprints the instance printed in its container log, read over the API
        (polled until `timeout_s`). Raises ProvisionError when the line never shows: no key may be
        trusted then."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        last = ""
        while True:
            try:
                text = self._call("logs", self._sdk.logs, instance_id, tail="1000")
                found = parse_host_keys(text if isinstance(text, str) else "")
                if found:
                    return found
                last = "no QAT_HOSTKEY line yet"
            except VastAPIError as e:
                last = str(e)
            if time.monotonic() >= deadline:
                raise ProvisionError(
                    f"instance {instance_id}: its onstart never printed the SSH host key fingerprints "
                    f"({HOSTKEY_MARK} lines) in the instance's container log within {timeout_s:.0f}s of running "
                    f"(last: {last[:200]}); refusing to connect without the host key from the provider's "
                    "channel. onstart must write them to PID 1's stdout (/proc/1/fd/1), which the log API serves")
            time.sleep(self.poll_s)


    def _wait_running(self, iid: int, timeout_s: float) -> dict:
        """Poll until running with an SSH endpoint and a filled row (HALF_FILLED fields set: a row
        of an instance being created is "not yet", never an error). Raises ProvisionError on
        failure states and at the deadline."""
        deadline = time.monotonic() + timeout_s
        status, seen, missing = None, False, []
        while True:
            row = self.show(iid)
            if row is None:  # Vast's show answers null for a while right after create: keep polling
                if seen:
                    raise ProvisionError(f"instance {iid} disappeared while starting")
                if time.monotonic() > deadline:
                    raise ProvisionError(f"instance {iid} never appeared in `show instance` within "
                                         f"{timeout_s:.0f}s (machine.provision_timeout_s)")
                time.sleep(self.poll_s)
                continue
            seen = True
            status, msg = row.get("actual_status"), str(row.get("status_msg") or "")
            if "OCI runtime" in msg or status in FAILED_STATES:
                raise ProvisionError(f"instance {iid} failed to start: status {status!r}: {msg[:300]}")
            missing = [f for f in HALF_FILLED if row.get(f) is None]
            if status == "running" and ssh_endpoint(row)[0] and not missing:
                return row
            if time.monotonic() > deadline:
                nulls = f"; still null: {', '.join(missing)}" if missing else ""
                raise ProvisionError(f"instance {iid} not running after {timeout_s:.0f}s "
                                     f"(status {status!r}: {msg[:200]}{nulls}); machine.provision_timeout_s")
            time.sleep(self.poll_s)

    def _look_for_created(self, label: str, known: set[int], wait_s: float) -> Optional[dict]:
        """After a create whose answer was lost or garbled, the instance may exist anyway (and the
        list may show it only a while later): look for an instance labelled exactly `label`, not
        among `known` (ours, already handled), for up to `wait_s`. One found is returned to be
        adopted; any further one is destroyed. Never re-sends the create."""
        deadline = time.monotonic() + max(0.0, wait_s)
        while True:
            try:
                rows = sorted((r for r in self.find_instances(label)
                               if r.get("label") == label and int(r["id"]) not in known), key=lambda r: int(r["id"]))
            except VastAPIError as e:
                rows = []
                self.log(f"looking for an instance labelled {label} after a failed create: {e}")
            if rows:
                for extra in rows[1:]:
                    self.log(f"instance {extra['id']} labelled {label} is a duplicate: destroying it")
                    known.add(int(extra["id"]))
                    try:
                        self.destroy(int(extra["id"]))
                    except VastAPIError as e:
                        self.log(f"instance {extra['id']}: destroy failed ({e}); the reaper will retry")
                return rows[0]
            if time.monotonic() >= deadline:
                return None
            time.sleep(min(self.poll_s, max(0.05, deadline - time.monotonic())))

    def _destroy_strays(self, label: str, keep: int, known: set[int]) -> None:
        """Once a lease is ready: any other instance with exactly our label that we did not handle
        (a lost create answer the list showed late) is destroyed."""
        try:
            for row in self.find_instances(label):
                rid = int(row["id"])
                if row.get("label") == label and rid != keep and rid not in known:
                    self.log(f"instance {rid} labelled {label} was never ours to use (a lost create answer?): "
                             "destroying it")
                    known.add(rid)
                    self.destroy(rid)
        except VastAPIError as e:
            self.log(f"could not check for stray instances labelled {label}: {e}; the reaper will")

    def launch(self, m: MachineConfig, label: str, public_key: str, key_path: Optional[str] = None,
               ready_check: Optional[Callable[[Lease], None]] = None, workload: Optional[TrainWorkload] = None) -> Lease:
        """Rent the matching offer on which `workload` costs least, wait for it to run (and pass ready_check, e.g. SSH).
        A failed start is logged (log tail), destroyed, its machine excluded, and the next offer tried,
        up to machine.vast.create_attempts times. Each failed start's instance billed from creation to
        its destroy: it is listed as a FailedStart in the lease's `failed_starts` (or, when the launch
        fails, the ProviderError's) so the run's budget counts it."""
        v = m.vast
        known: set[int] = set()  # every instance id of this launch (used, failed, destroyed)
        excluded: set[int] = set()
        reasons: list[str] = []
        failed_starts: list[FailedStart] = []

        def provision_error(message: str) -> ProvisionError:
            err = ProvisionError(message)
            err.failed_starts = failed_starts
            return err

        for attempt in range(1, v.create_attempts + 1):
            try:
                offer = self.search_offers(v, v.min_disk_gb, excluded, workload)[0]
            except NoOffersError as e:
                if not reasons:
                    raise
                raise provision_error("no other offer left to try after:\n  " + "\n  ".join(reasons) + f"\n{e}") from None
            machine_id = offer.get("machine_id")
            self.log(f"renting offer {offer['id']} (machine {machine_id}): {offer.get('gpu_name')} x"
                     f"{offer.get('num_gpus')} at ${float(offer['dph_total']):.3f}/h, attempt {attempt}/{v.create_attempts}")
            created_at = time.time()
            # Never re-sent: a create that ran server-side but whose answer was lost would rent a
            # second machine. After any failure or garbled answer, look by label and adopt what exists.
            failure, ambiguous = "", False
            try:
                res = self._call("create instance", self._sdk.create_instance, int(offer["id"]), image=v.image,
                                 disk=v.min_disk_gb, label=label, onstart_cmd=hostkeys.onstart_script(public_key),
                                 price=v.bid_dph if v.interruptible else None, ssh=True, direct=True,
                                 cancel_unavail=True, idempotent=False)
            except SearchQuotaExceeded:
                raise
            except VastAPIError as e:
                res, failure, ambiguous = None, f"create failed: {e}", e.ambiguous
            iid = res.get("new_contract") if isinstance(res, dict) else None
            if not failure and not (isinstance(res, dict) and res.get("success") and isinstance(iid, int)):
                failure, ambiguous = f"create refused: {self.redact(str(res))[:200]}", True
            if failure:
                found = self._look_for_created(label, known, self.create_settle_s if ambiguous else 0.0)
                if found is None:
                    reasons.append(f"offer {offer['id']}: {failure}")
                    excluded.add(machine_id)
                    continue
                iid = int(found["id"])
                self.log(f"offer {offer['id']}: {failure}; but instance {iid} labelled {label} exists: adopting it")
            known.add(iid)
            try:
                deadline = time.monotonic() + m.provision_timeout_s
                try:
                    self._call("attach ssh key", self._sdk.attach_ssh, iid, public_key)
                except VastAPIError as e:  # the onstart script installs the key as well
                    self.log(f"instance {iid}: attaching the SSH key failed ({e}); relying on onstart")
                row = self._wait_running(iid, m.provision_timeout_s)
                # the host keys, from the instance log over HTTPS: pinned before the first SSH connection
                fingerprints = self.wait_host_keys(iid, min(deadline - time.monotonic(), self.hostkey_wait_s))
                self.log(f"instance {iid}: host key(s) from the provider log: {', '.join(fingerprints)}")
                host, port = ssh_endpoint(row)
                lease = Lease(backend="vast", label=label, instance_id=iid, host=host, port=port, user="root",
                              key_path=key_path, host_key_fingerprints=fingerprints,
                              dph_total=float(row.get("dph_total") or offer["dph_total"]),
                              gpu_name=str(row.get("gpu_name") or offer.get("gpu_name") or ""),
                              num_gpus=int(row.get("num_gpus") or offer.get("num_gpus") or 0),
                              location=str(offer.get("geolocation") or ""), created_at=created_at,
                              machine_id=machine_id, offer_id=offer["id"],
                              ssh_alternatives=[list(e) for e in ssh_endpoints(row)[1:]],
                              inet_up_cost=float(row.get("inet_up_cost") or offer.get("inet_up_cost") or 0),
                              inet_down_cost=float(row.get("inet_down_cost") or offer.get("inet_down_cost") or 0),
                              failed_starts=failed_starts)
                if ready_check is not None:
                    ready_check(lease)
                self._destroy_strays(label, iid, known)
                self.log(f"instance {iid} running at {host}:{port}")
                return lease
            except BaseException as e:
                tail = self.logs_tail(iid) if isinstance(e, Exception) else ""
                destroyed_at: Optional[float] = None
                try:
                    self.destroy(iid)
                    destroyed_at = time.time()
                except Exception as d:
                    self.log(f"instance {iid}: destroy after failed start failed too: {d}; the reaper will retry")
                failed_starts.append(FailedStart(iid, float(offer["dph_total"]), created_at, destroyed_at, label))
                if isinstance(e, VastAPIError) and not isinstance(e, ProvisionError):
                    e.failed_starts = failed_starts  # ProviderError's declared field: the budget bills them
                    raise
                if not isinstance(e, Exception):  # a cancel: the flow's hooks and the reaper take over
                    raise
                reason = self.redact(f"{type(e).__name__}: {e}")
                self.log(f"instance {iid} on machine {machine_id} failed: {reason}\n--- log tail ---\n{tail}")
                reasons.append(f"instance {iid} (machine {machine_id}): {reason}")
                excluded.add(machine_id)
        raise provision_error(f"could not start a machine in {v.create_attempts} attempt(s) "
                             f"(machine.vast.create_attempts):\n  " + "\n  ".join(reasons))
