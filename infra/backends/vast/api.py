"""Vast.ai over the official SDK (`vastai.VastAI`): the one place SDK calls, retries, 429/quota
handling and redaction live, and the account's instances (show, find by label, destroy, logs).

Only the endpoint differs between the real console and the emulator (`server_url`). The API
key never appears in messages: SDK errors are re-raised as VastAPIError with the key and any
`api_key=` query value redacted, and without the original exception chained.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional

import requests
from vastai import VastAI

from contract.redaction import redact

from ..base import ProviderError

log = logging.getLogger("qat.vast")

GONE_STATES = {"unloaded", "destroyed", "deleted"}
RETRY_STATUS = {429, 500, 502, 503, 504}
MAX_RETRY_AFTER_S = 60.0  # the SDK's own cap (vastai 1.9.1 api/client.py _MAX_RETRY_AFTER_SECONDS)
QUOTA_MESSAGE = "Vast.ai daily search quota exceeded; retry after UTC midnight"


class VastAPIError(ProviderError):
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


def num(row: dict, field: str, what: str, default: Any = None) -> float:
    value = row.get(field, default)
    if value is None:
        raise VastAPIError(f"malformed {what}: field {field!r} is missing ({brief(row)})")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise VastAPIError(f"malformed {what}: field {field!r} is {value!r}, expected a number ({brief(row)})") from None


def brief(row: Any) -> str:
    if not isinstance(row, dict):
        return repr(row)[:80]
    return ", ".join(f"{k}={row[k]!r}" for k in ("id", "machine_id", "gpu_name", "actual_status") if k in row)


def check_instance(row: Any, what: str = "instance") -> dict:
    """The fields we rely on, present and of the right type; else a VastAPIError naming them."""
    if not isinstance(row, dict):
        raise VastAPIError(f"malformed {what}: expected an object, got {type(row).__name__}")
    for field in ("id", "actual_status", "dph_total"):
        if field not in row:
            raise VastAPIError(f"malformed {what}: field {field!r} is missing ({brief(row)})")
    num(row, "id", what)
    if row["dph_total"] is not None:  # null while the instance is being created (HALF_FILLED)
        num(row, "dph_total", what)
    for field in ("actual_status", "label", "status_msg", "ssh_host", "public_ipaddr", "cur_state"):
        if row.get(field) is not None and not isinstance(row[field], str):
            raise VastAPIError(f"malformed {what}: field {field!r} is {row[field]!r}, expected text ({brief(row)})")
    for field in ("ssh_port", "num_gpus", "start_date"):
        if row.get(field) is not None:
            num(row, field, what)
    if row.get("ports") is not None and not isinstance(row["ports"], dict):
        raise VastAPIError(f"malformed {what}: field 'ports' is {row['ports']!r}, expected an object")
    return row


class VastAPI:
    """One Vast.ai account's API. The key is never printed."""

    poll_s = 3.0  # seconds between two looks at an instance
    backoff_s = 1.0  # the first retry's delay (doubled after each, up to 30 s)

    def __init__(self, api_key: Optional[str] = None, server_url: Optional[str] = None, *, poll_s: Optional[float] = None,
                 retries: int = 6, backoff_s: Optional[float] = None, create_settle_s: Optional[float] = None,
                 hostkey_wait_s: Optional[float] = None, log_fn: Callable[[str], None] = log.info):
        if not api_key:
            raise VastAPIError("no Vast.ai API key: set VAST_API_KEY or save the Prefect Secret block 'vast-api-key'")
        self._key = api_key
        self.server_url = server_url
        self.retries = retries
        for name, value in (("poll_s", poll_s), ("backoff_s", backoff_s), ("create_settle_s", create_settle_s),
                            ("hostkey_wait_s", hostkey_wait_s)):
            if value is not None:
                setattr(self, name, value)
        self.log = log_fn
        # The SDK's own retry is a few tries within a fraction of a second: we retry 429/5xx bursts ourselves.
        self._sdk = VastAI(api_key=api_key, server_url=server_url, retry=1, quiet=True)

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
                                   f"got {brief(data)}")
            for row in data.get("instances") or []:
                if not isinstance(row, dict):
                    raise VastAPIError(f"Vast.ai list instances: malformed row, expected an object: {brief(row)}")
                label = row.get("label")
                if label is not None and not isinstance(label, str):  # cannot be told apart: never ours to touch
                    self.log(self.redact(f"skipped: malformed Vast.ai list instances row: field 'label' is "
                                         f"{label!r}, expected text ({brief(row)})"))
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

    def logs_tail(self, instance_id: int, lines: int = 30) -> str:
        try:
            text = self._call("logs", self._sdk.logs, instance_id, tail=str(max(lines, 50)))
        except Exception as e:
            return f"(no logs: {self.redact(str(e))[:200]})"
        text = text if isinstance(text, str) else str(text)
        return "\n".join(self.redact(text).splitlines()[-lines:])

