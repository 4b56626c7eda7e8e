"""Vast.ai over the official SDK (`vastai.VastAI`): search, launch, destroy, find by label.

Only the endpoint differs between the real console and the emulator (`server_url`). The API
key never appears in messages: SDK errors are re-raised as VastAPIError with the key and any
`api_key=` query value redacted, and without the original exception chained.

Host keys come over a second channel: the onstart script prints one `QAT_HOSTKEY <type>
SHA256:<fingerprint>` line per host key of the instance's sshd into the container's log (PID 1's
stdout: in SSH launch mode onstart's own output goes to /var/log/onstart.log, which the log API does
not serve); `launch` reads that log over the HTTPS API (the SDK's `logs`: request_logs, then the
result URL) before the first SSH connection, and the lease carries the fingerprints, so SSH accepts
only a key among them (infra/ssh.py). An attempt whose log shows no such line within
`hostkey_wait_s` of running is failed, destroyed, and the next offer tried. What this protects: the SSH path (a man in the middle, a recycled address). What it cannot:
the machine itself writes its log, so a hostile host can print its own keys (it is the machine we
rented, and everything it sends is checked as untrusted anyway).
"""
from __future__ import annotations

import logging
import os
import re
import shlex
import time
from typing import Any, Callable, Iterable, Optional

import requests
from vastai import VastAI

from contract.machine_config import MachineConfig, VastConfig
from contract.redaction import redact

from .gpu_speed import rank_offers
from .machine import Lease

log = logging.getLogger("qat.vast")

# `stopped`/`frozen`: an outbid interruptible instance is stopped (storage still bills): failed at
# start, lost when running (docs/REFERENCE.md section 1b).
FAILED_STATES = {"exited", "unknown", "offline", "stopped", "frozen"}
GONE_STATES = {"unloaded", "destroyed", "deleted"}
RETRY_STATUS = {429, 500, 502, 503, 504}
MAX_RETRY_AFTER_S = 60.0  # the SDK's own cap (vastai 1.9.1 api/client.py _MAX_RETRY_AFTER_SECONDS)
QUOTA_MESSAGE = "Vast.ai daily search quota exceeded; retry after UTC midnight"
HOSTKEY_MARK = "QAT_HOSTKEY"
# How long the QAT_HOSTKEY lines may take to reach the log API once the instance runs with an SSH
# endpoint (onstart prints them within seconds): an instance whose lines never come is failed then,
# not at the end of machine.provision_timeout_s.
HOSTKEY_WAIT_S = 120.0
# Fields a row of an instance being created shows null (docs/REFERENCE.md section 1b): not ready yet.
HALF_FILLED = ("start_date", "dph_total", "ports")
# One line per host key, exactly: the mark, the key type, OpenSSH's SHA256 fingerprint (43 base64 chars).
_HOSTKEY_LINE = re.compile(rf"{HOSTKEY_MARK} ((?:ssh|ecdsa|sk)-[A-Za-z0-9@.-]+) (SHA256:[A-Za-z0-9+/]{{43}})")


class VastAPIError(RuntimeError):
    """The Vast.ai API failed or answered something we cannot use. The message says which call.
    `status`: the HTTP status when there was one. `retryable`: True for what a later try may fix
    (429, 5xx, network), False otherwise (tasks/retry.py reads it). `ambiguous`: the request may
    have been carried out although no usable answer came back (5xx, lost connection, garbage)."""

    def __init__(self, message: str, status: Optional[int] = None, retryable: bool = False,
                 ambiguous: bool = False):
        super().__init__(message)
        self.status, self.retryable, self.ambiguous = status, retryable, ambiguous


class VastNotFound(VastAPIError):
    """404 / no_such_instance: the instance is gone (or never was)."""


class SearchQuotaExceeded(VastAPIError):
    """A JSON 429 `search_quota_exceeded`: a daily quota, reset at UTC midnight; no retry fixes it."""


class NoOffersError(VastAPIError):
    """No offer matches the filters (deterministic: loosen machine.vast.* and try again)."""


class ProvisionError(VastAPIError):
    """Every attempt to start an instance failed; the message lists each attempt's reason."""


def _num(row: dict, field: str, what: str, default: Any = None) -> float:
    value = row.get(field, default)
    if value is None:
        raise VastAPIError(f"malformed {what}: field {field!r} is missing ({_brief(row)})")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise VastAPIError(f"malformed {what}: field {field!r} is {value!r}, expected a number ({_brief(row)})") from None


def _brief(row: Any) -> str:
    if not isinstance(row, dict):
        return repr(row)[:80]
    return ", ".join(f"{k}={row[k]!r}" for k in ("id", "machine_id", "gpu_name", "actual_status") if k in row)


def check_instance(row: Any, what: str = "instance") -> dict:
    """The fields we rely on, present and of the right type; else a VastAPIError naming them."""
    if not isinstance(row, dict):
        raise VastAPIError(f"malformed {what}: expected an object, got {type(row).__name__}")
    for field in ("id", "actual_status", "dph_total"):
        if field not in row:
            raise VastAPIError(f"malformed {what}: field {field!r} is missing ({_brief(row)})")
    _num(row, "id", what)
    if row["dph_total"] is not None:  # null while the instance is being created (HALF_FILLED)
        _num(row, "dph_total", what)
    for field in ("actual_status", "label", "status_msg", "ssh_host", "public_ipaddr", "cur_state"):
        if row.get(field) is not None and not isinstance(row[field], str):
            raise VastAPIError(f"malformed {what}: field {field!r} is {row[field]!r}, expected text ({_brief(row)})")
    for field in ("ssh_port", "num_gpus", "start_date"):
        if row.get(field) is not None:
            _num(row, field, what)
    if row.get("ports") is not None and not isinstance(row["ports"], dict):
        raise VastAPIError(f"malformed {what}: field 'ports' is {row['ports']!r}, expected an object")
    return row


def _norm_gpu(name: str) -> str:
    return str(name).replace("_", " ").strip().lower()


class VastProvider:
    """One Vast.ai account. `api_key` defaults to env VAST_API_KEY; never printed."""

    def __init__(self, api_key: Optional[str] = None, server_url: Optional[str] = None, *,
                 poll_s: float = 3.0, retries: int = 6, backoff_s: float = 1.0, create_settle_s: float = 60.0,
                 hostkey_wait_s: float = HOSTKEY_WAIT_S, log_fn: Callable[[str], None] = log.info):
        key = api_key or os.environ.get("VAST_API_KEY")
        if not key:
            raise VastAPIError("no Vast.ai API key: pass api_key or set VAST_API_KEY "
                               "(or save the Prefect Secret block 'vast-api-key')")
        self._key = key
        self.server_url = server_url
        self.poll_s, self.retries, self.backoff_s = poll_s, retries, backoff_s
        # how long to look (by label) for an instance a create may have made when its answer was lost
        self.create_settle_s = create_settle_s
        self.hostkey_wait_s = hostkey_wait_s
        self.log = log_fn
        # The SDK's own retry is short (3 tries, 0.15 s): we retry 429/5xx bursts ourselves.
        self._sdk = VastAI(api_key=key, server_url=server_url, retry=1, quiet=True)

    def __repr__(self) -> str:
        return f"VastProvider(server_url={self.server_url!r})"

    # -- the one place SDK calls go through --------------------------------------------------------
    def redact(self, text: str) -> str:
        return redact(text, [self._key])

    @staticmethod
    def _retry_after(response: Any) -> Optional[float]:
        try:
            return max(0.0, min(float(response.headers["Retry-After"]), MAX_RETRY_AFTER_S))
        except (KeyError, TypeError, ValueError, AttributeError):
            return None

    @staticmethod
    def _is_quota(response: Any) -> bool:
        try:
            body = response.json()
        except Exception:  # noqa: BLE001 - plain-text 429s are the ordinary rate limit
            return False
        return isinstance(body, dict) and body.get("error") == "search_quota_exceeded"

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, idempotent: bool = True, **kwargs: Any) -> Any:
        """Call the SDK, retrying 429/5xx/connection errors with backoff (a 429's Retry-After, capped
        at 60 s, when it sends one); errors come out redacted. A daily search quota 429 is never
        retried (SearchQuotaExceeded). `idempotent=False` (create): only a plain 429 is retried (the
        request was refused before it ran); a 5xx, timeout or lost connection raises at once with
        `ambiguous` set, because the server may have carried it out: the caller looks, never re-sends."""
        delay = self.backoff_s
        for attempt in range(1, self.retries + 1):
            try:
                return fn(*args, **kwargs)
            except requests.HTTPError as e:
                resp = e.response
                status = resp.status_code if resp is not None else None
                body = (resp.text[:200] if resp is not None else "").strip()
                if status == 429 and resp is not None and self._is_quota(resp):
                    raise SearchQuotaExceeded(f"{QUOTA_MESSAGE} ({what})", status=429) from None
                if status == 404:
                    raise VastNotFound(self.redact(f"Vast.ai {what}: not found (HTTP 404): {body}"),
                                       status=404) from None
                retryable = status in RETRY_STATUS
                ambiguous = retryable and status != 429
                if retryable and attempt < self.retries and (idempotent or not ambiguous):
                    err = f"HTTP {status}"
                    wait = self._retry_after(resp) if status == 429 else None
                    if wait is not None:
                        log.warning("Vast.ai %s: HTTP 429, Retry-After %.1fs (%d/%d)", what, wait, attempt, self.retries)
                        time.sleep(wait)
                        continue
                else:
                    hint = " (is the API key valid?)" if status in (401, 403) else ""
                    raise VastAPIError(self.redact(f"Vast.ai {what} failed: HTTP {status}{hint}: {body}"),
                                       status=status, retryable=retryable, ambiguous=ambiguous) from None
            except (requests.ConnectionError, requests.Timeout) as e:
                if attempt >= self.retries or not idempotent:
                    raise VastAPIError(self.redact(f"Vast.ai {what} failed: cannot reach the API or the answer "
                                                   f"was lost ({type(e).__name__}: {e})"),
                                       retryable=True, ambiguous=True) from None
                err = type(e).__name__
            except ValueError as e:  # JSONDecodeError: an HTML page or other non-JSON answer
                raise VastAPIError(self.redact(f"Vast.ai {what}: the API answered something that is not JSON "
                                               f"(an HTML error page?): {e}"), ambiguous=True) from None
            except (KeyError, TypeError, AttributeError, IndexError) as e:
                raise VastAPIError(self.redact(f"Vast.ai {what}: malformed response, the SDK could not read "
                                               f"it ({type(e).__name__}: {e})"), ambiguous=True) from None
            except Exception as e:  # anything else the SDK raises: still wrapped, still redacted
                raise VastAPIError(self.redact(f"Vast.ai {what} failed: {type(e).__name__}: {e}"),
                                   ambiguous=True) from None
            log.warning("Vast.ai %s: %s, retrying in %.1fs (%d/%d)", what, err, delay, attempt, self.retries)
            time.sleep(delay)
            delay = min(delay * 2, 30.0)
        raise AssertionError("unreachable")

    # -- offers ---------------------------------------------------------------------------------
    @staticmethod
    def _filters(v: VastConfig, disk_gb: float) -> dict:
        q: dict = {
            "gpu_name": {"in": list(v.gpu_names)},
            "gpu_ram": {"gte": v.min_gpu_ram_gb * 1000},  # MB on the wire
            "num_gpus": {"eq": v.num_gpus},
            "disk_space": {"gte": disk_gb},
            "reliability": {"gte": v.min_reliability},
            "cuda_max_good": {"gte": v.min_cuda},
            "inet_down": {"gte": v.min_inet_down_mbps},
            "inet_down_cost": {"lte": v.max_inet_cost_per_gb},
            "inet_up_cost": {"lte": v.max_inet_cost_per_gb},
            "rentable": {"eq": True},
            "rented": {"eq": False},
            "dph_total": {"lte": v.max_dph},
        }
        if v.verified:
            q["verified"] = {"eq": True}
        return q

    @staticmethod
    def describe_filters(v: VastConfig, disk_gb: float) -> str:
        kind = f"interruptible (bid ${v.bid_dph}/h)" if v.interruptible else "on-demand"
        return (f"gpu_name in {list(v.gpu_names)} (machine.vast.gpu_names), gpu_ram >= {v.min_gpu_ram_gb:g} GB "
                f"(min_gpu_ram_gb), num_gpus = {v.num_gpus}, disk_space >= {disk_gb:g} GB (min_disk_gb), "
                f"reliability >= {v.min_reliability:g} (min_reliability), cuda_max_good >= {v.min_cuda:g} (min_cuda), "
                f"inet_down >= {v.min_inet_down_mbps:g} Mb/s (min_inet_down_mbps), "
                f"inet_down_cost and inet_up_cost <= ${v.max_inet_cost_per_gb:g}/GB (max_inet_cost_per_gb), "
                f"{'verified, ' if v.verified else ''}rentable, {kind}, dph_total <= ${v.max_dph:g}/h (max_dph)")

    @staticmethod
    def _mismatch(o: dict, v: VastConfig, disk_gb: float) -> Optional[str]:
        """Why an offer does not fit (checked here too: never trust the server-side filter alone)."""
        names = {_norm_gpu(n) for n in v.gpu_names}
        what = "offer"
        checks = [
            (_norm_gpu(o.get("gpu_name", "")) in names, "gpu_name"),
            (_num(o, "gpu_ram", what) >= v.min_gpu_ram_gb * 1000 * 0.97, "gpu_ram"),  # MB vs GB*1000 rounding
            (int(_num(o, "num_gpus", what)) == v.num_gpus, "num_gpus"),
            (_num(o, "disk_space", what) >= disk_gb, "disk_space"),
            (_num(o, "reliability", what, o.get("reliability2")) >= v.min_reliability, "reliability"),
            (_num(o, "cuda_max_good", what) >= v.min_cuda, "cuda_max_good"),
            (_num(o, "inet_down", what) >= v.min_inet_down_mbps, "inet_down"),
            (_num(o, "inet_down_cost", what, 0) <= v.max_inet_cost_per_gb, "inet_down_cost"),
            (_num(o, "inet_up_cost", what, 0) <= v.max_inet_cost_per_gb, "inet_up_cost"),
            (o.get("rentable", True) is not False and not o.get("rented", False), "rentable"),
            (not v.verified or o.get("verified") in (True, 1, "true", "True"), "verified"),
            (_num(o, "dph_total", what) <= v.max_dph, "dph_total"),
        ]
        if v.interruptible:
            checks.append((_num(o, "min_bid", what, 0) <= (v.bid_dph or 0), "min_bid"))
        for ok, field in checks:
            if not ok:
                return field
        return None

    def search_offers(self, v: VastConfig, disk_gb: Optional[float] = None,
                      exclude_machines: Iterable[int] = ()) -> list[dict]:
        """Matching offers, cheapest first. Raises NoOffersError naming every filter when none fit."""
        disk_gb = float(disk_gb or v.min_disk_gb)
        query = self._filters(v, disk_gb)
        offers = self._call("search offers", self._sdk.search_offers, query=query,
                            type="bid" if v.interruptible else "on-demand", order="dph_total",
                            limit=100, storage=disk_gb, no_default=True)
        if not isinstance(offers, list):
            raise VastAPIError(f"Vast.ai search offers: expected a list of offers, got {type(offers).__name__}")
        excluded = set(exclude_machines)
        good, rejected = [], {}
        for o in offers:
            for field in ("id", "gpu_name", "dph_total", "machine_id"):
                if not isinstance(o, dict) or field not in o:
                    raise VastAPIError(f"Vast.ai search offers: malformed offer without {field!r}: {_brief(o)}")
            why = self._mismatch(o, v, disk_gb)
            if why is None and o.get("machine_id") in excluded:
                why = "excluded machine (failed earlier)"
            if why:
                rejected[why] = rejected.get(why, 0) + 1
            else:
                good.append(o)
        if not good:
            seen = f"{len(offers)} offer(s) returned" + (f", rejected by {rejected}" if rejected else "")
            raise NoOffersError(f"no Vast.ai offer matches: {self.describe_filters(v, disk_gb)} ({seen}). "
                                "Loosen those machine.vast.* settings (or raise max_dph) and try again.")
        ranked = rank_offers(good, v.workload)  # the whole run: hours x $/h + bytes x $/GB; short of memory: left out
        if not ranked:
            raise NoOffersError(f"no Vast.ai offer has the GPU memory machine.vast.workload needs ({v.workload}): "
                                f"{len(good)} offer(s) matched the filters. Lower train.per_device_batch_size "
                                "or raise machine.vast.min_gpu_ram_gb.")
        return ranked

    # The market filters left_out counts: the CUDA the pinned torch needs, the host's bandwidth price.
    MARKET_FILTERS = ("cuda_max_good", "inet_down_cost", "inet_up_cost")

    def left_out(self, v: VastConfig, disk_gb: Optional[float] = None) -> dict:
        """How many offers that pass every other filter the market filters leave out, per filter
        (cuda_max_good: the host's driver is too old for the pinned torch's CUDA; inet_*_cost: the
        host's bandwidth price is over machine.vast.max_inet_cost_per_gb). One more search."""
        disk_gb = float(disk_gb or v.min_disk_gb)
        query = {k: c for k, c in self._filters(v, disk_gb).items() if k not in self.MARKET_FILTERS}
        offers = self._call("search offers", self._sdk.search_offers, query=query,
                            type="bid" if v.interruptible else "on-demand", order="dph_total",
                            limit=1000, storage=disk_gb, no_default=True)
        counts = {f: 0 for f in self.MARKET_FILTERS}
        for o in offers if isinstance(offers, list) else []:
            try:
                why = self._mismatch(o, v, disk_gb) if isinstance(o, dict) else None
            except VastAPIError:
                continue
            if why in counts:
                counts[why] += 1
        return {"offers_seen": len(offers) if isinstance(offers, list) else 0, **counts}

    # -- instances ------------------------------------------------------------------------------
    def show(self, instance_id: int) -> Optional[dict]:
        """The instance's row, or None when the API says it does not exist ({"instances": null} or a
        404: Vast answers null for a while after destroy, then 404; also null right after create).
        A row of an instance being created may be half-filled (HALF_FILLED fields null): returned as
        is, so the SDK's own `show_instance` (it computes `time.time() - start_date`) is not used."""
        try:
            row = self._call("show instance", self._show_row, instance_id)
        except VastNotFound:
            return None
        return None if row is None else check_instance(row, f"Vast.ai show instance {instance_id} answer")

    def _show_row(self, instance_id: int) -> Any:
        """vastai 1.9.1's show_instance request, without its arithmetic on start_date."""
        r = self._sdk.client.get(f"/instances/{int(instance_id)}/", query_args={"owner": "me"})
        r.raise_for_status()
        return r.json()["instances"]

    def find_instances(self, label_prefix: str) -> list[dict]:
        """Instances whose label starts with label_prefix (and are not already gone).

        Pages through `/api/v1/instances/` itself (the SDK's show_instances computes
        `time.time() - start_date` on every row and dies on one null). Rows of other instances in the
        account (label null or not ours) may have null fields: they are skipped unread; our own rows
        are validated (check_instance: HALF_FILLED fields may be null) and one that fails is logged
        and skipped, never the end of the listing; so is a row whose label is not text (it cannot be
        told apart). A page that is not a list of objects is an error."""
        params: dict = {"select_filters": {}, "order_by": [{"col": "id", "dir": "asc"}], "limit": 25}
        out: list[dict] = []
        for _ in range(10_000):
            data = self._call("list instances", self._sdk.show_instances_v1, dict(params))
            if not isinstance(data, dict) or not isinstance(data.get("instances", []), (list, type(None))):
                raise VastAPIError(f"Vast.ai list instances: expected an object with a list of instances, "
                                   f"got {_brief(data)}")
            for row in data.get("instances") or []:
                if not isinstance(row, dict):
                    raise VastAPIError(f"Vast.ai list instances: malformed row, expected an object: {_brief(row)}")
                label = row.get("label")
                if label is not None and not isinstance(label, str):  # cannot be told apart: never ours to touch
                    self.log(self.redact(f"skipped: malformed Vast.ai list instances row: field 'label' is "
                                         f"{label!r}, expected text ({_brief(row)})"))
                    continue
                if label is None or not label.startswith(label_prefix):
                    continue  # another project's instance: its fields are not ours to judge
                try:
                    check_instance(row, "Vast.ai list instances row")
                except VastAPIError as e:
                    self.log(f"skipped: {self.redact(str(e))}")
                    continue
                if row.get("cur_state") not in GONE_STATES:
                    out.append(row)
            token = data.get("next_token")
            if not token:
                return out
            params["after_token"] = token
        raise VastAPIError("Vast.ai list instances: the pages never end (next_token keeps coming)")

    def is_running(self, instance_id: int) -> bool:
        """True only while `running` (stopped/outbid, exited, offline, gone: not alive)."""
        row = self.show(instance_id)
        return bool(row) and row.get("actual_status") == "running"

    def destroy(self, instance_id: int, timeout_s: float = 180.0) -> bool:
        """Destroy (never stop: stopped instances keep billing storage) and confirm it is gone.
        DELETE is always sent (at least once: `show` answers null right after create too, so null
        alone proves nothing), again while the row stays visible; a 404 / no_such_instance counts as
        gone, and so does `show` answering null or 404 after a DELETE.
        Returns True once confirmed; raises VastAPIError when it cannot be confirmed in time."""
        deadline = time.monotonic() + timeout_s
        last, wait = "", 0.25
        while True:
            try:
                try:
                    self._call("destroy instance", self._sdk.destroy_instance, instance_id)
                except VastNotFound:
                    return True
                row = self.show(instance_id)
                if row is None or row.get("cur_state") in GONE_STATES or row.get("actual_status") in GONE_STATES:
                    return True
            except VastAPIError as e:
                last = str(e)
                log.warning("destroy %s: %s", instance_id, last)
            if time.monotonic() > deadline:
                raise VastAPIError(f"instance {instance_id} still exists {timeout_s:.0f}s after destroy "
                                   f"(last error: {last or 'none'}); destroy it in the Vast.ai console, "
                                   "or run `python -m infra.reaper`")
            time.sleep(wait)
            wait = min(wait * 2, self.poll_s)

    def logs_tail(self, instance_id: int, lines: int = 30, redact: Iterable[str] = ()) -> str:
        try:
            text = self._call("logs", self._sdk.logs, instance_id, tail=str(max(lines, 50)))
        except Exception as e:
            return f"(no logs: {self.redact(str(e))[:200]})"
        text = text if isinstance(text, str) else str(text)
        for s in redact:
            if s and len(s) >= 4:
                text = text.replace(s, "***")
        return "\n".join(self.redact(text).splitlines()[-lines:])

    # SHA256 fingerprint of an OpenSSH public key file (what `ssh-keygen -l -E sha256` prints), for
    # images without ssh-keygen: base64 of the key blob's sha256, unpadded. No single quotes (shell).
    _FINGERPRINT_PY = ("import base64,hashlib,sys; b=open(sys.argv[1]).read().split()[1]; "
                       "print(\"SHA256:\"+base64.b64encode(hashlib.sha256(base64.b64decode(b)).digest()).decode().rstrip(\"=\"))")

    @staticmethod
    def onstart_script(public_key: str) -> str:
        """What a rented instance runs at start (docs/REFERENCE.md section 7), in this order:
        1. `touch ~/.no_auto_tmux`: Vast images attach SSH sessions to tmux otherwise, and a command
           sent without a terminal does not run;
        2. the image's container environment (its Docker ENV: PATH to its python, CUDA variables)
           written to /etc/environment, which SSH sessions read (SSH launch mode replaces the image's
           entrypoint, so they get a minimal PATH otherwise); names that look like secrets (KEY,
           TOKEN, SECRET, PASSW) and per-shell ones are left out;
        3. the host keys' fingerprints printed (one `QAT_HOSTKEY <type> SHA256:<fp>` line each, host
           keys generated first if the image has none; computed by the image's python where it has no
           ssh-keygen of its own, as `pytorch/pytorch`) to the container's log, PID 1's stdout
           (`/proc/1/fd/1`), which the log API serves, and to onstart's own output (Vast's
           /var/log/onstart.log, which it does not serve); the product connects only after reading
           them, so 1 and 2 are in place by its first command;
        4. our key installed for root (keys may also be attached through the API).
        `VAST_EMULATED_ETC` / `VAST_EMULATED_PROC` are the emulator's stand-ins for the image's /etc
        and /proc (it runs no container); unset on Vast.ai."""
        k = shlex.quote(public_key)
        shell = ('touch ~/.no_auto_tmux; etc="${VAST_EMULATED_ETC:-/etc}"; '
                 "env | grep -E '^[A-Za-z_][A-Za-z0-9_]*=' "
                 "| grep -vE '^(HOME|PWD|OLDPWD|SHLVL|_|HOSTNAME|TERM|SSH_[A-Z_]*)=' "
                 "| grep -viE '^[A-Za-z0-9_]*(KEY|TOKEN|SECRET|PASSW)[A-Za-z0-9_]*=' "
                 '> "$etc/environment.qat" && mv -f "$etc/environment.qat" "$etc/environment"; ')
        hostkeys = ('ls "$etc"/ssh/ssh_host_*_key.pub >/dev/null 2>&1 || ssh-keygen -A >/dev/null 2>&1; '
                    f"fp() {{ if command -v ssh-keygen >/dev/null 2>&1; then ssh-keygen -l -E sha256 -f \"$1\" | cut -d' ' -f2; "
                    f"else for py in python3 python /opt/conda/bin/python; do command -v $py >/dev/null 2>&1 && "
                    f"{{ $py -c '{VastProvider._FINGERPRINT_PY}' \"$1\"; break; }}; done; fi; }}; "
                    'hk="$(for f in "$etc"/ssh/ssh_host_*_key.pub; do [ -f "$f" ] && '
                    f'echo "{HOSTKEY_MARK} $(cut -d" " -f1 "$f") $(fp "$f")"; '
                    'done)"; printf "%s\\n" "$hk"; '
                    'printf "%s\\n" "$hk" 2>/dev/null >> "${VAST_EMULATED_PROC:-/proc}/1/fd/1"; ')
        return (shell + hostkeys + "mkdir -p ~/.ssh && chmod 700 ~/.ssh && touch ~/.ssh/authorized_keys && "
                f"(grep -qxF {k} ~/.ssh/authorized_keys || echo {k} >> ~/.ssh/authorized_keys) && "
                "chmod 600 ~/.ssh/authorized_keys")

    @staticmethod
    def parse_host_keys(log_text: str) -> list[str]:
        """["<type> SHA256:<fp>", ...] from the `QAT_HOSTKEY` lines of an instance log (whole lines
        only, so a name an attacker gets into an sshd log line cannot pass for one), in order, once each."""
        found: list[str] = []
        for line in (log_text or "").splitlines():
            m = _HOSTKEY_LINE.fullmatch(line.strip())
            if m and f"{m[1]} {m[2]}" not in found:
                found.append(f"{m[1]} {m[2]}")
        return found

    def wait_host_keys(self, instance_id: int, timeout_s: float) -> list[str]:
        """The host key fingerprints the instance printed in its container log, read over the API
        (polled until `timeout_s`). Raises ProvisionError when the line never shows: no key may be
        trusted then."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        last = ""
        while True:
            try:
                text = self._call("logs", self._sdk.logs, instance_id, tail="1000")
                found = self.parse_host_keys(text if isinstance(text, str) else "")
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

    @staticmethod
    def ssh_endpoints(row: dict) -> list[tuple[str, int]]:
        """Direct (public_ipaddr + mapped 22/tcp) first, then the proxy (ssh_host:ssh_port)."""
        out: list[tuple[str, int]] = []
        ports = row.get("ports") or {}
        mapped = ports.get("22/tcp") if isinstance(ports, dict) else None
        if row.get("public_ipaddr") and isinstance(mapped, list) and mapped and isinstance(mapped[0], dict):
            try:
                out.append((str(row["public_ipaddr"]).strip(), int(mapped[0].get("HostPort"))))
            except (TypeError, ValueError):
                pass
        if row.get("ssh_host") and row.get("ssh_port"):
            try:
                proxy = (str(row["ssh_host"]).strip(), int(row["ssh_port"]))
            except (TypeError, ValueError):
                raise VastAPIError(f"malformed instance: ssh_port is {row.get('ssh_port')!r}") from None
            if proxy not in out:
                out.append(proxy)
        return out

    @classmethod
    def ssh_endpoint(cls, row: dict) -> tuple[Optional[str], Optional[int]]:
        found = cls.ssh_endpoints(row)
        return found[0] if found else (None, None)

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
            if status == "running" and self.ssh_endpoint(row)[0] and not missing:
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
               ready_check: Optional[Callable[[Lease], None]] = None, redact: Iterable[str] = (),
               on_failed_start: Optional[Callable[[dict], None]] = None) -> Lease:
        """Rent the cheapest matching offer, wait for it to run (and pass ready_check, e.g. SSH).
        A failed start is logged (log tail), destroyed, its machine excluded, and the next offer tried,
        up to machine.vast.create_attempts times. Each failed start's instance billed from creation to
        its destroy: it is reported as {instance_id, dph_total, created_at, destroyed_at (None when not
        confirmed), label} to `on_failed_start`, and listed in the lease's extra["failed_starts"] (or
        the ProvisionError's `failed_starts`) so the run's budget counts it."""
        v = m.vast
        known: set[int] = set()  # every instance id of this launch (used, failed, destroyed)
        excluded: set[int] = set()
        reasons: list[str] = []
        failed_starts: list[dict] = []

        def failed_start(record: dict) -> None:
            failed_starts.append(record)
            if on_failed_start is not None:
                on_failed_start(record)

        def provision_error(message: str) -> ProvisionError:
            err = ProvisionError(message)
            err.failed_starts = failed_starts  # type: ignore[attr-defined]
            return err

        for attempt in range(1, v.create_attempts + 1):
            try:
                offer = self.search_offers(v, v.min_disk_gb, excluded)[0]
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
                                 disk=v.min_disk_gb, label=label, onstart_cmd=self.onstart_script(public_key),
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
                host, port = self.ssh_endpoint(row)
                lease = Lease(backend="vast", label=label, instance_id=iid, host=host, port=port, user="root",
                              key_path=key_path, host_key_fingerprints=fingerprints,
                              dph_total=float(row.get("dph_total") or offer["dph_total"]),
                              gpu_name=str(row.get("gpu_name") or offer.get("gpu_name") or ""),
                              num_gpus=int(row.get("num_gpus") or offer.get("num_gpus") or 0),
                              location=str(offer.get("geolocation") or ""), created_at=created_at,
                              extra={"machine_id": machine_id, "offer_id": offer["id"],
                                     "ssh_alternatives": [list(e) for e in self.ssh_endpoints(row)[1:]],
                                     "inet_up_cost": float(row.get("inet_up_cost") or offer.get("inet_up_cost") or 0),
                                     "inet_down_cost": float(row.get("inet_down_cost") or offer.get("inet_down_cost") or 0),
                                     "failed_starts": failed_starts})
                if ready_check is not None:
                    ready_check(lease)
                self._destroy_strays(label, iid, known)
                self.log(f"instance {iid} running at {host}:{port}")
                return lease
            except BaseException as e:
                tail = self.logs_tail(iid, redact=redact) if isinstance(e, Exception) else ""
                destroyed_at: Optional[float] = None
                try:
                    self.destroy(iid)
                    destroyed_at = time.time()
                except Exception as d:
                    self.log(f"instance {iid}: destroy after failed start failed too: {d}; the reaper will retry")
                failed_start({"instance_id": iid, "dph_total": float(offer["dph_total"]), "created_at": created_at,
                              "destroyed_at": destroyed_at, "label": label})
                if not isinstance(e, Exception) or isinstance(e, VastAPIError) and not isinstance(e, ProvisionError):
                    e.failed_starts = failed_starts  # type: ignore[attr-defined]
                    raise
                reason = self.redact(f"{type(e).__name__}: {e}")
                self.log(f"instance {iid} on machine {machine_id} failed: {reason}\n--- log tail ---\n{tail}")
                reasons.append(f"instance {iid} (machine {machine_id}): {reason}")
                excluded.add(machine_id)
        raise provision_error(f"could not start a machine in {v.create_attempts} attempt(s) "
                             f"(machine.vast.create_attempts):\n  " + "\n  ".join(reasons))
