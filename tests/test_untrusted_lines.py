"""What a machine prints is hostile too: endless lines, terminal escapes, marker lines home cannot
use, a STEP_ERROR that asks for retries. A real sshd plays the machine (its "python" is a shell
script printing them); the product's own SSHMachine.run, run_remote_step and setup_environment
read it. Each must cost bounded work, show nothing a terminal would obey, never raise in on_line,
and leave the retry decision to home."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

import tasks.remote_step
import tasks.rental
from contract.config import load_config
from contract.layout import REMOTE_CODE, REMOTE_WORK
from infra.machines.machine import Lease
from infra.machines.ssh import SSHMachine
from tasks.billing import BudgetExceeded
from tasks.remote_step import run_remote_step
from tasks.rental import forget_machine, remote_python, setup_environment
from tasks.retry import StepFailed, is_transient
from task_loggers import plain_loggers_for


plain_loggers = plain_loggers_for(tasks.remote_step, tasks.rental)


def _lease(sshd_host, **kw) -> Lease:
    return Lease(backend="ssh", label=f"qat-lines-{sshd_host.port}", host=sshd_host.host, port=sshd_host.port,
                 user=sshd_host.user, key_path=str(sshd_host.key_path), **kw)


def _cfg(sshd_host, **overrides):
    return load_config("tiny", {"machine.backend": "ssh", "machine.ssh.host": sshd_host.host,
                                "machine.ssh.port": sshd_host.port, "machine.ssh.key_path": str(sshd_host.key_path),
                                "machine.ssh_timeout_s": 20, **overrides})


def _fake_program(home: Path, rel: str, script: str) -> None:
    """An executable at rel (relative to qat/code, where steps run) on the machine: a shell script."""
    path = (home / REMOTE_CODE / rel).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)
    (home / REMOTE_CODE).mkdir(parents=True, exist_ok=True)


def test_an_endless_line_is_cut_noted_and_stripped_of_escapes(sshd_host):
    """3 MiB without a newline: on_line runs while it streams (a note every MiB: infra/machines/streams.py
    CUT_NOTE_BYTES), the line shown is at most 16 KiB (MAX_LINE_BYTES), and a clear-screen / retitle /
    colour never reaches the console."""
    seen: list[tuple[float, str]] = []
    with SSHMachine(_lease(sshd_host), connect_timeout=20).connect() as m:
        m.run(["sh", "-c", "head -c 3145728 /dev/zero | tr '\\0' x; printf '\\n\\033[2J\\033]0;owned\\007\\033[31mred"
                           "\\tok\\033[0m\\r\\nbell\\007 and \\302\\23331mc1 csi\\n'"],
              on_line=lambda line: seen.append((time.monotonic(), line)))
    lines = [line for _, line in seen]
    assert len(lines[0]) < 16 * 1024 + 100 and lines[0].startswith("x" * 1000) and "line cut" in lines[0]
    notes = [line for line in lines if line.startswith("[the line goes on")]
    assert len(notes) == 2, lines[1:]
    assert lines[-3].startswith("[end of a cut line: ")
    assert lines[-2:] == ["red\tok", "bell and c1 csi"]
    assert not any(c in "".join(lines) for c in "\x1b\x07\x9b\r")


def test_the_budget_is_checked_while_an_endless_line_streams(sshd_host, tmp_path, caplog):
    """A step that prints 1 MiB every 0.2 s for 12 s without a newline, on a machine that crosses the
    $1 cap after 2 s: the budget stops it long before the line (or the step) ends. Counted in the
    line's MiB notes home read (one each CUT_NOTE_BYTES), not timed: home reads at most what the
    machine printed by then (~10 MiB; a slower home reads less), where the whole line is 60."""
    _fake_program(sshd_host.home, remote_python(_lease(sshd_host), _cfg(sshd_host)),
                  "i=0; while [ $i -lt 60 ]; do head -c 1048576 /dev/zero | tr '\\0' x; sleep 0.2; i=$((i+1)); done\n")
    lease = _lease(sshd_host, dph_total=1800.0, created_at=time.time())  # $0.50 a second
    cfg = _cfg(sshd_host)
    try:
        with caplog.at_level(logging.INFO, logger="test"), pytest.raises(BudgetExceeded):
            run_remote_step.fn(lease, cfg, "bench", tmp_path / "work")
    finally:
        forget_machine(lease)
    notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[the line goes on")]
    assert len(notes) < 30, notes[-1]


BAD_MARKERS = ['PROGRESS {"done": 1, "total": "lots"}', 'PROGRESS {"done": Infinity, "total": 10}',
               'PROGRESS {"done": 1, "total": 1e999}', 'PROGRESS {"done": 1, "total": 10, "first_step_s": "soon"}',
               'PROGRESS {"done": ' + "9" * 400 + ', "total": 10}', 'PROGRESS ' + "[" * 5000 + "]" * 5000,
               'PROGRESS [1, 2]', 'PROGRESS {broken', 'STEP_ERROR ' + "{" * 3000]


@pytest.mark.parametrize("code, retryable", [(3, False), (1, True), (137, False)])
def test_bad_markers_are_ignored_and_home_decides_the_retry(sshd_host, tmp_path, caplog, code, retryable):
    """Marker lines home cannot use are logged and ignored (the step is not killed by them); the
    machine's STEP_ERROR says retryable: true, but only the exit code class counts."""
    printed = BAD_MARKERS + ['STEP_ERROR {"step": "bench", "message": "\\u001b[2Jdisk full", "retryable": true}']
    script = "".join(f"printf '%s\\n' '{line}'\n" for line in printed) + f"exit {code}\n"
    _fake_program(sshd_host.home, remote_python(_lease(sshd_host), _cfg(sshd_host)), script)
    (sshd_host.home / REMOTE_WORK / "bench").mkdir(parents=True, exist_ok=True)
    lease = _lease(sshd_host)
    try:
        with caplog.at_level(logging.WARNING, logger="test"), pytest.raises(StepFailed) as e:
            run_remote_step.fn(lease, _cfg(sshd_host), "bench", tmp_path / "work")
    finally:
        forget_machine(lease)
    assert e.value.retryable is retryable and is_transient(e.value) is retryable
    assert "disk full" in str(e.value) and "\x1b" not in str(e.value)
    ignored = [r.getMessage() for r in caplog.records if "was ignored" in r.getMessage()]
    assert len(ignored) == len(BAD_MARKERS), ignored
    assert (tmp_path / "work" / "bench" / "error.json").is_file()  # the machine's report is kept for the log


def test_setup_decides_the_retry_at_home_too(sshd_host, caplog):
    """steps.bootstrap's STEP_ERROR claims retryable, its exit code (3) says deterministic: not retried."""
    _fake_program(sshd_host.home, "fake-image-python",
                  "printf '%s\\n' 'STEP_ERROR {\"message\": \"CUDA unusable\", \"retryable\": true}' "
                  "'STEP_ERROR {\"message\": ' \nexit 3\n")
    lease = _lease(sshd_host)
    cfg = _cfg(sshd_host, **{"machine.python": str((sshd_host.home / REMOTE_CODE / "fake-image-python").resolve())})
    try:
        with caplog.at_level(logging.WARNING, logger="test"), pytest.raises(StepFailed) as e:
            setup_environment.fn(lease, cfg)
    finally:
        forget_machine(lease)
    assert e.value.retryable is False and "CUDA unusable" in str(e.value)
    assert any("was ignored" in r.getMessage() for r in caplog.records)
