"""Where things live: this repository, and the run's layout on a machine (relative to its home)."""
from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"

# What the orchestrator sends to a machine: the files git tracks in these (infra/machines/streams.py collect_files),
# never untracked files, data, venvs or caches.
PUSHED_CODE = ("contract", "steps", "configs", "fixtures", "requirements-remote.txt", "pyproject.toml")
REQUIREMENTS = "requirements-remote.txt"

REMOTE_ROOT = "qat"
REMOTE_CODE = f"{REMOTE_ROOT}/code"
REMOTE_WORK = f"{REMOTE_ROOT}/work"
REMOTE_CONFIG = f"{REMOTE_ROOT}/run.yaml"
REMOTE_VENVS = f"{REMOTE_ROOT}/venv"  # the steps' venvs, one per requirements hash and build (remote_env.py)
