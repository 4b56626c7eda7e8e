"""Shared pytest fixtures. Each section belongs to one part of the project; keep additions additive."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- models and data
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
    from contract.config import load_config

    return load_config("tiny", overrides)


@pytest.fixture(scope="session")
def prepared_tiny(tmp_path_factory) -> Path:
    """A workdir holding prepare/ for configs/tiny.yaml (16 train, 4 dev, 4 test clips)."""
    from steps import prepare
    from steps.common import execute_step

    workdir = tmp_path_factory.mktemp("prepared-tiny")
    assert execute_step("prepare", tiny_config(), workdir, prepare.run) == 0
    return workdir


# ---------------------------------------------------------------- Vast.ai emulator, sshd, local stack

def require_sshd() -> None:
    """Skip the calling test (or fixture) unless OpenSSH's sshd is installed: the emulator's
    instances, `sshd_host` and the stack are real sshd servers."""
    from devtools.emulator.sshd import SshdError, check_sshd_installed

    try:
        check_sshd_installed()
    except SshdError as e:
        pytest.skip(str(e))


@pytest.fixture
def sshd_host(tmp_path):
    """A real OpenSSH server on 127.0.0.1 for SSH round trips.

    Yields `devtools.emulator.testing.SshdHost`: .host, .port, .user ("root"), .key_path (ed25519
    private key), .home (remote HOME = cwd = SFTP start dir), .host_key ("ssh-ed25519 AAAA..."),
    .stop()/.start() (simulate a dropped server).
    """
    from devtools.emulator.testing import start_sshd_host

    require_sshd()
    host = start_sshd_host(tmp_path / "sshd")
    try:
        yield host
    finally:
        host.stop()


@pytest.fixture
def emulator(tmp_path):
    """A fresh Vast.ai emulator (subprocess, boot 0.6 s) for one test.

    Yields `devtools.emulator.testing.EmulatorProcess`: .url, .api_key, .set_faults(id=, label_prefix=,
    **knobs), .clear_faults(), .ledger(), .instance_info(id), .restart(), .state_dir.
    Teardown fails the test if an instance was left alive or an sshd survived shutdown.
    """
    from devtools.emulator.testing import EmulatorProcess

    require_sshd()
    emu = EmulatorProcess(state_dir=tmp_path / "vast-emulator").start()
    try:
        yield emu
    finally:
        if emu.proc is None:  # the test stopped it: bring it back to read the ledger
            emu.start()
        leftovers = [r["id"] for r in emu.live_instances()]
        emu.cleanup()
        leaked = emu.sshd_pids()
    assert not leftovers, f"instances left alive (never destroyed): {leftovers}"
    assert not leaked, f"sshd processes survived emulator shutdown: {leaked}"


@pytest.fixture(scope="module")
def stack_options() -> dict:
    """Keyword arguments for the module's `stack` (devtools.stack.Stack); a test module overrides
    this fixture to set e.g. api_key, env or runner_limit."""
    return {}


@pytest.fixture(scope="module")
def stack(request, tmp_path_factory, stack_options):
    """A real local stack for the module (devtools.stack.Stack: Prefect server, emulator with real
    sshd, a Runner serving qat). Teardown fails if an instance was left alive or a process of the
    stack outlived it."""
    require_sshd()
    from devtools.stack import Stack

    s = Stack(tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2].removeprefix("test_")),
              **stack_options)
    with s:
        yield s
        assert s.emu.live_instances() == [], "an instance was left alive"
    assert s.survivors == [], f"processes of the stack outlived it: {s.survivors}"


@pytest.fixture(scope="session")
def tiny_onnx_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """Plain fp32 ONNX export (optimum, with past) of the tiny random Whisper, processor included."""
    from optimum.exporters.onnx import main_export

    from steps.models import load_processor

    out = tmp_path_factory.mktemp("tiny-onnx")
    main_export(tiny_model_dir, output=out, task="automatic-speech-recognition-with-past")
    load_processor(tiny_model_dir).save_pretrained(out)
    return out
