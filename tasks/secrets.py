"""Where the credentials come from: the environment first, then Prefect Secret blocks.

Values are returned to the caller and never logged; Prefect masks Secret reprs."""
from __future__ import annotations

import os
from typing import Optional

VAST_SECRET_BLOCK = "vast-api-key"
HF_SECRET_BLOCK = "hf-token"


def _secret_block(name: str) -> Optional[str]:
    try:
        from prefect.blocks.system import Secret

        value = Secret.load(name).get()
    except Exception:  # block missing, or no API to ask: treat as not configured
        return None
    return str(value) if value else None


def vast_api_key() -> Optional[str]:
    return os.environ.get("VAST_API_KEY") or _secret_block(VAST_SECRET_BLOCK)


def hf_token() -> Optional[str]:
    return os.environ.get("HF_TOKEN") or _secret_block(HF_SECRET_BLOCK)


def vast_url() -> Optional[str]:
    """The Vast.ai API endpoint: None means the real console; the demo points it at the emulator."""
    return os.environ.get("VAST_URL") or None


def known_secrets() -> list[str]:
    """Every secret value in play, for redaction of text that leaves the process."""
    return [s for s in (vast_api_key(), hf_token()) if s]


def redact(text: str, secrets: Optional[list[str]] = None) -> str:
    for s in secrets if secrets is not None else known_secrets():
        if s and len(s) >= 4:
            text = text.replace(s, "***")
    return text
