"""Shared pytest fixtures. Each section belongs to one part of the project; keep additions additive."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- models and data (W1)
# Fixture models are cached in $WHISPER_QAT_CACHE (default ~/.cache/whisper-qat) across sessions.

@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    """Directory of the random tiny Whisper (same tokenizer/processor as whisper-base)."""
    from steps.models import resolve_model

    return resolve_model("fixture:tiny-random")


@pytest.fixture(scope="session")
def french_manifest() -> list[dict]:
    """Rows of the committed espeak-ng French fixture manifest."""
    lines = (REPO / "fixtures" / "french" / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def tiny_config(**overrides):
    """configs/tiny.yaml with dotted overrides, e.g. tiny_config(**{"data.max_samples": 4})."""
    from steps.config import load_config

    return load_config("tiny", overrides)


@pytest.fixture(scope="session")
def prepared_tiny(tmp_path_factory) -> Path:
    """A workdir holding prepare/ for configs/tiny.yaml (16 train, 4 dev, 4 test clips)."""
    from steps import prepare
    from steps.common import run_step

    workdir = tmp_path_factory.mktemp("prepared-tiny")
    assert run_step("prepare", tiny_config(), workdir, prepare.run) == 0
    return workdir
