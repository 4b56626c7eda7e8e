"""Vast.ai keys and environments the endpoint checks are tested with (tests/test_demo_separation.py,
tests/test_vast_endpoint.py)."""
from __future__ import annotations

from tasks import secrets

EMU_KEY = secrets.EMULATOR_KEY_PREFIX + "0123456789abcdef0123456789abcdef"
REAL_LOOKING_KEY = "a3f1" * 16  # 64 letters and digits, no dash


def use_env(monkeypatch, env: dict) -> None:
    for k in ("VAST_URL", "VAST_API_KEY", "VAST_API_KEY_BLOCK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
