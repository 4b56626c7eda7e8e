"""Secrets out of text that leaves the process (logs, error messages, artifacts, reports): one rule
for every caller, each passing the secret values it holds."""
from __future__ import annotations

import re
from typing import Iterable, Optional

MASK = "***"
MIN_SECRET_CHARS = 4  # shorter values would mask ordinary text and are no credential
# A credential in a URL or header, whoever's it is: the value after api_key= or Bearer.
_IN_REQUESTS = (re.compile(r"(api_key=)[^&\s'\"]+"), re.compile(r"(Bearer\s+)[^\s'\"]+"))


def redact(text: str, secrets: Iterable[Optional[str]]) -> str:
    """`text` with every given secret, and any api_key=... or Bearer ... value, replaced by MASK."""
    for secret in secrets:
        if secret and len(secret) >= MIN_SECRET_CHARS:
            text = text.replace(secret, MASK)
    for pattern in _IN_REQUESTS:
        text = pattern.sub(rf"\g<1>{MASK}", text)
    return text
