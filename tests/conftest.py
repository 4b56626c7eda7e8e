"""Shared pytest fixtures. Each section belongs to one part of the project; keep additions additive."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- where tests may write
# Set before Prefect, Hugging Face or matplotlib are imported: their homes and caches go to one
# temporary folder per session, never ~/.prefect or ~/.cache. The one shared cache is the fixture
# models' ($WHISPER_QAT_CACHE, explicitly ~/.cache/whisper-qat unless set): building whisper-base
# takes minutes, and resolve_model writes it atomically, so sessions may share it.
SESSION_HOME = Path(tempfile.mkdtemp(prefix="qat-tests-"))
os.environ.setdefault("WHISPER_QAT_CACHE", str(Path.home() / ".cache" / "whisper-qat"))
os.environ.update({
    "PREFECT_HOME": str(SESSION_HOME / "prefect"),
    "XDG_CACHE_HOME": str(SESSION_HOME / "cache"),
    "HF_HOME": str(SESSION_HOME / "hf"),
    "MPLCONFIGDIR": str(SESSION_HOME / "matplotlib"),
})
for _var in ("HF_HUB_CACHE", "HF_DATASETS_CACHE", "TRANSFORMERS_CACHE"):  # would override HF_HOME
    os.environ.pop(_var, None)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(SESSION_HOME, ignore_errors=True)


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
    """Keyword arguments for the module's `stack` (devtools.throwaway_stack.Stack); a test module overrides
    this fixture to set e.g. api_key, env or runner_limit."""
    return {}


@pytest.fixture(scope="module")
def stack(request, tmp_path_factory, stack_options):
    """A real local stack for the module (devtools.throwaway_stack.Stack: Prefect server, emulator with real
    sshd, a Runner serving qat). Teardown fails if an instance was left alive or a process of the
    stack outlived it."""
    require_sshd()
    from devtools.throwaway_stack import Stack

    s = Stack(tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2].removeprefix("test_")),
              **stack_options)
    with s:
        yield s
        assert s.emu.live_instances() == [], "an instance was left alive"
    assert s.survivors == [], f"processes of the stack outlived it: {s.survivors}"


@pytest.fixture(scope="module")
def evil_machine(tmp_path_factory):
    """One emulated instance rented through the product (host key from the provider log), connected."""
    from contract.config import load_config
    from devtools.emulator.testing import EmulatorProcess
    from infra.backends import registry as provision
    from infra.backends.vast.credentials import VastCredentials
    from infra.backends.vast.instances import VastProvider

    require_sshd()
    root = tmp_path_factory.mktemp("untrusted")
    saved = VastProvider.poll_s, VastProvider.backoff_s
    VastProvider.poll_s, VastProvider.backoff_s = 0.2, 0.02  # the emulator boots in seconds: look often
    emu = EmulatorProcess(state_dir=root / "emulator").start()
    lease = m = None
    try:
        mc = load_config("tiny", {"machine.provision_timeout_s": 30, "machine.ssh_timeout_s": 30}).machine
        lease = provision.acquire(mc, "qat-evil", root / "runs" / "r", VastCredentials(emu.api_key, emu.url),
                                  log=lambda msg: None)
        assert lease.host_key_source == "provider log"
        m = provision.connect(lease, timeout=30)
        yield emu, lease, m, root
    finally:
        VastProvider.poll_s, VastProvider.backoff_s = saved
        if m is not None:
            m.close()
        if lease is not None:
            assert provision.release(lease, VastCredentials(emu.api_key, emu.url)) is True
        live = emu.live_instances()
        emu.cleanup()
        leaked = emu.sshd_pids()
    assert live == [], f"the evil machine was not destroyed: {live}"
    assert not leaked, f"sshd survived: {leaked}"


@pytest.fixture(scope="session")
def tiny_onnx_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """Plain fp32 ONNX export (optimum, with past) of the tiny random Whisper, processor included."""
    from optimum.exporters.onnx import main_export

    from steps.models import load_processor

    out = tmp_path_factory.mktemp("tiny-onnx")
    main_export(tiny_model_dir, output=out, task="automatic-speech-recognition-with-past")
    load_processor(tiny_model_dir).save_pretrained(out)
    return out


# ---------------------------------------------------------------- Prefect and the emulator's pace

@pytest.fixture(scope="module")
def prefect_server():
    """A real, temporary Prefect server (its own database) for the module's flow runs."""
    from prefect_api import prefect_harness

    with prefect_harness():  # no events worker left bound to an earlier module's server (tests/prefect_api.py)
        yield


@pytest.fixture
def fast_polling(monkeypatch):
    """The Vast backend polls the emulator every 0.2 s instead of a real cloud's pace."""
    from infra.backends.vast.instances import VastProvider

    monkeypatch.setattr(VastProvider, "poll_s", 0.2)
    monkeypatch.setattr(VastProvider, "backoff_s", 0.02)


# ---------------------------------------------------------------- no network

@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test (and is recorded)."""
    import socket

    tried = []

    def refuse(self, address, *a, **k):
        tried.append(address)
        raise AssertionError(f"a connection to {address} was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: refuse(None, address))
    return tried


# ---------------------------------------------------------------- the emulator as the flow's Vast.ai

@pytest.fixture
def emulated_vast(tmp_path, monkeypatch):
    """The emulator as the flow's Vast.ai (key, endpoint, runs dir set); nothing left running after."""
    from devtools.emulator.testing import EmulatorProcess

    emu = EmulatorProcess(state_dir=tmp_path / "emulator").start()
    monkeypatch.setenv("VAST_API_KEY", emu.api_key)
    monkeypatch.setenv("VAST_URL", emu.url)
    monkeypatch.setenv("QAT_RUNS_DIR", str(tmp_path / "runs"))
    try:
        yield emu
        assert emu.live_instances() == [], "an instance was left running"
    finally:
        emu.cleanup()
        assert emu.sshd_pids() == [], "an sshd was left running"
