"""Test servers never race for a port: the emulator binds port 0 and reports the port it got; sshd and
the local stack's Prefect server, which cannot, start again on another port when the one picked was taken."""
from __future__ import annotations

import socket

import devtools.emulator.testing as testing
from conftest import require_sshd


def test_sshd_host_takes_another_port_when_its_first_was_taken(tmp_path, monkeypatch):
    require_sshd()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        picks = iter([port])
        real = testing.free_port
        monkeypatch.setattr(testing, "free_port", lambda: next(picks, None) or real())
        host = testing.start_sshd_host(tmp_path / "sshd")
        try:
            assert host.port != port and host.sshd.alive()
        finally:
            host.stop()


def test_the_emulator_listens_on_the_port_it_reports(tmp_path):
    require_sshd()
    emu = testing.EmulatorProcess(state_dir=tmp_path / "emu").start()
    try:
        assert emu.port > 0 and emu.url == f"http://127.0.0.1:{emu.port}"
        assert emu.admin("GET", "/_emulator/health")
        emu.restart()  # clients keep its URL: a restart binds the same port
        assert emu.url == f"http://127.0.0.1:{emu.port}" and emu.admin("GET", "/_emulator/health")
    finally:
        emu.cleanup()


def test_the_stack_serves_prefect_on_another_port_when_its_first_was_taken(tmp_path):
    from devtools.throwaway_stack import Stack

    require_sshd()
    stack = Stack(tmp_path / "stack", reaper=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", stack.port))
        taken.listen()
        first = stack.port
        with stack:
            assert stack.port != first and stack.api_url == f"http://127.0.0.1:{stack.port}/api"
            assert stack.server.alive()
    assert stack.survivors == []
