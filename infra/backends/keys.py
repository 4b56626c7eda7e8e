"""A fresh SSH key pair per rental: ed25519, in a folder 0700 of the run's work directory, both
files 0600, whatever the umask; a pair already in the folder is replaced, never reused.

The private key never leaves that file and is never logged; only the public key string
(OpenSSH format) goes to Vast.ai.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


@dataclass(frozen=True)
class KeyPair:
    private_path: Path
    public_key: str  # "ssh-ed25519 AAAA... comment"

    def __repr__(self) -> str:  # the path only, never key material
        return f"KeyPair(private_path={str(self.private_path)!r})"


def generate_keypair(directory: Path, name: str = "id_ed25519", comment: str = "qat") -> KeyPair:
    """Write a new pair `directory/name` and `directory/name.pub` (folder 0700, files 0600 whatever
    the umask; files already there are replaced, never reused or followed); return it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    public_str = f"{public.decode()} {comment}"
    path = directory / name
    for target, data in ((path, private), (directory / f"{name}.pub", (public_str + "\n").encode())):
        if target.is_symlink() or target.exists():
            target.unlink()
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)  # whatever the umask was
            f.write(data)
    return KeyPair(path, public_str)
