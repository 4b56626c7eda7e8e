"""A fresh SSH key pair per run: ed25519, private key 0600 in the run's work directory.

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
    """Write `directory/name` (mode 0600) and `directory/name.pub`; return both."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    public_str = f"{public.decode()} {comment}"
    path = directory / name
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    os.chmod(path, 0o600)  # whatever the umask was
    (directory / f"{name}.pub").write_text(public_str + "\n")
    return KeyPair(path, public_str)


def load_or_generate(directory: Path, name: str = "id_ed25519") -> KeyPair:
    """Reuse the run's key pair when it exists (a resumed run), else make one."""
    path = Path(directory) / name
    pub = path.with_name(f"{name}.pub")
    if path.is_file() and pub.is_file():
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        return KeyPair(path, pub.read_text().strip())
    return generate_keypair(directory, name)
