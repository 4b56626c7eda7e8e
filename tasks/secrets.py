"""Where the credentials come from: the environment first, then Prefect Secret blocks.

Values are returned to the caller and never logged; Prefect masks Secret reprs.

The Vast.ai key and its endpoint are checked together before any request (`vast_api_key`): the real
console never gets an emulator key, and an emulator never gets a key shaped like a real one. The
demo deployment names its own endpoint (`VAST_URL`) and Secret block (`VAST_API_KEY_BLOCK`) in its
job variables (prefect.yaml); real deployments set neither, so they use the console and `vast-api-key`.
"""
from __future__ import annotations

import os
from typing import Optional

from contract import redaction

# The check itself lives in infra/ (the reaper CLI uses it too); re-exported here for the flow's callers.
from infra.vast_endpoint import (DEMO_VAST_SECRET_BLOCK, EMULATOR_KEY_PREFIX, VAST_SECRET_BLOCK,  # noqa: F401
                                 VastCredentialsRefused, check_vast_credentials, is_real_endpoint)

HF_SECRET_BLOCK = "hf-token"


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


def known_secrets() -> list[str]:
    """Every secret value in play, for redaction of text that leaves the process (unchecked: a refused
    key is redacted too)."""
    return [s for s in (_vast_key_and_source()[0], hf_token()) if s]


def redact(text: str, secrets: Optional[list[str]] = None) -> str:
    """`text` with `secrets` (default: every secret in play) masked (contract/redaction.py)."""
    return redaction.redact(text, known_secrets() if secrets is None else secrets)
