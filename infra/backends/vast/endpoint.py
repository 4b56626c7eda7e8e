"""Which Vast.ai API key may go to which endpoint: checked before any request wherever the key is
read (credentials.py: for the flow and the reaper CLI alike). Pure: no I/O.

The real console is exactly `https://console.vast.ai` (port 443, no user, path or query): the key
never travels in plain HTTP or to another port of that host. The console never gets an emulator key,
and any other endpoint (an emulator) never gets a key shaped like a real one.
"""
from __future__ import annotations

import re
from typing import Optional
from urllib.parse import urlsplit

from ..base import ProviderError

CONSOLE_URL = "https://console.vast.ai"
REAL_VAST_HOSTS = {"console.vast.ai"}
VAST_SECRET_BLOCK = "vast-api-key"
# The local stack's emulator key (devtools/stack.py mints `emu-<hex>`) and the block it lives in.
EMULATOR_KEY_PREFIX = "emu-"
DEMO_VAST_SECRET_BLOCK = "vast-emulator-api-key"
# A key of letters and digits only, 32 or longer, is taken for one the console issued; every key this
# project gives an emulator has a dash (emu-..., the tests' test-emulator-key, vastkey-chaos-0000).
_REAL_LOOKING_KEY = re.compile(r"[A-Za-z0-9]{32,}")


class VastCredentialsRefused(ProviderError):
    """The Vast.ai key does not belong to the endpoint it would be sent to; nothing was sent."""

    retryable = False  # tasks/retry.py: no retry fixes a configuration


def is_real_endpoint(url: Optional[str]) -> bool:
    """None (the SDK's default) or exactly https://console.vast.ai[:443][/]."""
    if url is None:
        return True
    parts = urlsplit(url)
    return (parts.scheme == "https" and parts.netloc.lower() in {h for c in REAL_VAST_HOSTS for h in (c, f"{c}:443")}
            and parts.path in ("", "/") and not parts.query and not parts.fragment)


def check_vast_credentials(key: str, url: Optional[str], source: str = "the Vast.ai key") -> None:
    """Refuse, before any request: an endpoint that names the console but is not exactly it (plain HTTP,
    another port), an emulator key for the real console, a real-looking key for anything else. The
    message says where the key came from and what to do."""
    if url is not None and not is_real_endpoint(url) and any(h in url.lower() for h in REAL_VAST_HOSTS):
        raise VastCredentialsRefused(
            f"refusing to send the Vast.ai API key (from {source}) to {url!r}: the Vast.ai console is reached "
            f"only as {CONSOLE_URL} (HTTPS, port 443); plain HTTP or another port would hand the key to whoever "
            f"is on the path. Leave VAST_URL unset (or --url off for the reaper) for the real console.")
    if is_real_endpoint(url) and key.startswith(EMULATOR_KEY_PREFIX):
        raise VastCredentialsRefused(
            f"refusing to send the local emulator's API key (from {source}) to the real Vast.ai API: it "
            f"was made by the demo stack (`make demo`). Save your Vast.ai API key in the Secret block "
            f"{VAST_SECRET_BLOCK!r} (python -c \"from prefect.blocks.system import Secret; "
            f"Secret(value='YOUR_KEY').save('{VAST_SECRET_BLOCK}', overwrite=True)\") or in VAST_API_KEY "
            f"of the qat-pool worker; the demo keeps its key in {DEMO_VAST_SECRET_BLOCK!r}.")
    if not is_real_endpoint(url) and _REAL_LOOKING_KEY.fullmatch(key):
        raise VastCredentialsRefused(
            f"refusing to send what looks like a real Vast.ai API key (from {source}) to {url}, which "
            f"is not the Vast.ai console: VAST_URL points at an emulator or another service. Real runs "
            f"leave VAST_URL unset; the demo deployment sets it with VAST_API_KEY_BLOCK="
            f"{DEMO_VAST_SECRET_BLOCK!r} (prefect.yaml): unset VAST_API_KEY in the worker that serves "
            f"the demo pool, or run the real deployment on its own pool (qat-pool).")
