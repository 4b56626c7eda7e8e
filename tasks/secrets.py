"""Where the credentials come from: the environment first, then Prefect Secret blocks.

Values are returned to the caller and never logged; Prefect masks Secret reprs.

Each backend reads and checks its own credentials (infra/backends/<name>: `credentials`), given
this module's way to read a Prefect Secret block; the flow's tasks, its teardown hooks and the reap
flow all ask through `credentials(backend)`. The Vast.ai key and its endpoint are checked together
before any request: the real console never gets an emulator key, and an emulator never gets a key
shaped like a real one (infra/backends/vast/endpoint.py).
"""
from __future__ import annotations

import os
from typing import Any, Optional

from contract import redaction
from infra.backends import registry
# Re-exported for the flow's callers and the dev tools: the Vast.ai endpoint check and its names.
from infra.backends.vast.endpoint import (DEMO_VAST_SECRET_BLOCK, EMULATOR_KEY_PREFIX, VAST_SECRET_BLOCK,  # noqa: F401
                                          VastCredentialsRefused, check_vast_credentials, is_real_endpoint)

HF_SECRET_BLOCK = "hf-token"


def _secret_block(name: str) -> Optional[str]:
    try:
        from prefect.blocks.system import Secret

        value = Secret.load(name).get()
    except Exception:  # block missing, or no API to ask: treat as not configured
        return None
    return str(value) if value else None


def credentials(backend: str) -> Any:
    """The backend's own credentials, checked before any request (refused with the fix); None
    when it needs none or none are configured."""
    return registry.backend(backend).credentials(lambda name: _secret_block(name))


def all_credentials() -> dict[str, Any]:
    """Every registered backend's credentials (backend name -> what `credentials` returns)."""
    return {name: credentials(name) for name in registry.BACKENDS}


def hf_token() -> Optional[str]:
    return os.environ.get("HF_TOKEN") or _secret_block(HF_SECRET_BLOCK)


def known_secrets() -> list[str]:
    """Every secret value in play, for redaction of text that leaves the process (unchecked: a refused
    key is redacted too)."""
    found = [s for b in registry.BACKENDS.values() for s in b.secret_values(lambda name: _secret_block(name))]
    return [s for s in (*found, hf_token()) if s]


def redact(text: str, secrets: Optional[list[str]] = None) -> str:
    """`text` with `secrets` (default: every secret in play) masked (contract/redaction.py)."""
    return redaction.redact(text, known_secrets() if secrets is None else secrets)
