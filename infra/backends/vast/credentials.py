"""Where the Vast.ai key and endpoint come from, read in this one place: the environment first
(VAST_API_KEY, VAST_URL), then the secret store the caller hands in (`secret_block(name)`: Prefect
Secret blocks for the flow; none for the reaper CLI). The key is checked against its endpoint
(endpoint.py) before any request.

The demo deployment names its own endpoint (`VAST_URL`) and Secret block (`VAST_API_KEY_BLOCK`) in
its job variables (prefect.yaml); real deployments set neither, so they use the console and `vast-api-key`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from ..base import SecretBlock
from .endpoint import VAST_SECRET_BLOCK, check_vast_credentials


@dataclass(frozen=True)
class VastCredentials:
    api_key: str
    server_url: Optional[str]  # None: the real console

    def __repr__(self) -> str:  # never the key
        return f"VastCredentials(server_url={self.server_url!r})"


def endpoint_url() -> Optional[str]:
    """The Vast.ai API endpoint: None means the real console; the demo points it at the emulator."""
    return os.environ.get("VAST_URL") or None


def secret_block_name() -> str:
    """The secret that holds the key: `vast-api-key` unless a deployment names another."""
    return os.environ.get("VAST_API_KEY_BLOCK") or VAST_SECRET_BLOCK


def read_key(secret_block: SecretBlock) -> tuple[Optional[str], str]:
    """(the key, unchecked, or None; where it came from, for messages)."""
    if os.environ.get("VAST_API_KEY"):
        return os.environ["VAST_API_KEY"], "the environment variable VAST_API_KEY"
    block = secret_block_name()
    return secret_block(block), f"the Prefect Secret block {block!r}"


def vast_credentials(secret_block: SecretBlock) -> Optional[VastCredentials]:
    """The key and its endpoint, checked together (VastCredentialsRefused otherwise); None without a key."""
    key, source = read_key(secret_block)
    if not key:
        return None
    url = endpoint_url()
    check_vast_credentials(key, url, source)
    return VastCredentials(key, url)
