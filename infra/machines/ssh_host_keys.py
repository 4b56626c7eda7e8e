"""SSH host keys: their text and fingerprint, and the policy that pins one on the first
connection (infra/machines/ssh.py): a key the provider's second channel listed, or the first seen."""
from __future__ import annotations

import base64
import hashlib
from typing import Optional, Sequence

import paramiko

from .machine import MachineError


class HostKeyChanged(MachineError):
    """The host answered with another key than the one pinned for it: refused, never retried."""

    retryable = False


def host_key_string(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {key.get_base64()}"


def host_key_fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's SHA256 fingerprint (`ssh-keygen -l -E sha256`): 'SHA256:' + unpadded base64."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


def parse_host_key(text: str) -> paramiko.PKey:
    kind, data = text.split()[:2]
    return paramiko.PKey.from_type_string(kind, base64.b64decode(data))


class HostKeyMismatch(HostKeyChanged):
    """The first connection met a host key the provider's channel did not list: refused, never retried."""


class PinHostKey(paramiko.MissingHostKeyPolicy):
    """With a pinned key: anything else is refused. Without one: with fingerprints from a second
    channel, accept only a key among them; with none, accept and remember the first key (TOFU)."""

    def __init__(self, pinned: Optional[str], fingerprints: Sequence[str] = ()):
        self.pinned, self.seen = pinned, None
        self.fingerprints = {f.split()[-1] for f in fingerprints if f and f.split()}

    def missing_host_key(self, client, hostname, key):
        if self.pinned:
            raise HostKeyChanged(f"{hostname} offered a {key.get_name()} host key, but a "
                                 f"{self.pinned.split()[0]} key was pinned for it on first connect")
        if self.fingerprints:
            fp = host_key_fingerprint(key)
            if fp not in self.fingerprints:
                raise HostKeyMismatch(
                    f"{hostname} offered {key.get_name()} host key {fp}, which is not among the "
                    f"{len(self.fingerprints)} host key fingerprint(s) the instance printed in its provider log "
                    f"({', '.join(sorted(self.fingerprints))}): refusing to connect (the connection is intercepted, "
                    "or this is not the rented machine)")
        self.seen = host_key_string(key)
