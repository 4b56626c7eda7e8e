"""Where the credentials come from: the environment first, then Prefect Secret blocks.

Values are returned to the caller and never logged; Prefect masks Secret reprs.

The Vast.ai key and its endpoint are checked together before any request (`vast_api_key`): the real
console never gets an emulator key, and an emulator never gets a key shaped like a real one. The
demo deployment names its own endpoint (`VAST_URL`) and Secret block (`VAST_API_KEY_BLOCK`) in its
job variables (prefect.yaml); real deployments set neither, so they use the console and `vast-api-key`.
"""
from __future__ import annotations

import os
import re
from typing import Optional
from urllib.parse import urlsplit

VAST_SECRET_BLOCK = "vast-api-key"
HF_SECRET_BLOCK = "hf-token"
# The local stack's emulator key (devtools/stack.py mints `emu-<hex>`) and the block it lives in.
EMULATOR_KEY_PREFIX = "emu-"
DEMO_VAST_SECRET_BLOCK = "vast-emulator-api-key"
REAL_VAST_HOSTS = {"console.vast.ai"}
# A key of letters and digits only, 32 or longer, is taken for one the console issued; every key this
# project gives an emulator has a dash (emu-..., the tests' test-emulator-key, vastkey-chaos-0000).
_REAL_LOOKING_KEY = re.compile(r"[A-Za-z0-9]{32,}")


class VastCredentialsRefused(RuntimeError):
    """The Vast.ai key does not belong to the endpoint it would be sent to; nothing was sent."""

    retryable = False  # tasks/retry.py: no retry fixes a configuration


def _secret_block(name: str) -> Optional[str]:
    try:
        from prefect.blocks.system import Secret

        value = Secret.load(name).get()
    except Exception:  # block missing, or no API to ask: treat as not configured
        return None
    return str(value) if value else None


def vast_secret_block() -> str:
    """The Secret block that holds the Vast.ai key: `vast-api-key` unless a deployment names another."""
    return os.environ.get("VAST_API_KEY_BLOCK") or VAST_SECRET_BLOCK


def _vast_key_and_source() -> tuple[Optional[str], str]:
    if os.environ.get("VAST_API_KEY"):
        return os.environ["VAST_API_KEY"], "the environment variable VAST_API_KEY"
    block = vast_secret_block()
    return _secret_block(block), f"the Prefect Secret block {block!r}"


def vast_api_key() -> Optional[str]:
    """The Vast.ai key, checked against the endpoint it is for (VastCredentialsRefused otherwise)."""
    key, source = _vast_key_and_source()
    if key:
        check_vast_credentials(key, vast_url(), source)
    return key


def hf_token() -> Optional[str]:
    return os.environ.get("HF_TOKEN") or _secret_block(HF_SECRET_BLOCK)


def vast_url() -> Optional[str]:
    """The Vast.ai API endpoint: None means the real console; the demo points it at the emulator."""
    return os.environ.get("VAST_URL") or None


def is_real_endpoint(url: Optional[str]) -> bool:
    return url is None or (urlsplit(url).hostname or "").lower() in REAL_VAST_HOSTS


def check_vast_credentials(key: str, url: Optional[str], source: str = "the Vast.ai key") -> None:
    """Refuse, before any request, an emulator key for the real console and a real-looking key for
    anything else. The message says where the key came from and what to do."""
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


def known_secrets() -> list[str]:
    """Every secret value in play, for redaction of text that leaves the process (unchecked: a refused
    key is redacted too)."""
    return [s for s in (_vast_key_and_source()[0], hf_token()) if s]


def redact(text: str, secrets: Optional[list[str]] = None) -> str:
    for s in secrets if secrets is not None else known_secrets():
        if s and len(s) >= 4:
            text = text.replace(s, "***")
    return text
