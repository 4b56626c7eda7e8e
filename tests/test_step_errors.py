"""How a failed step reports itself and what home makes of it: out of memory is deterministic (a retry
on the same machine and config runs out again, and is paid for), and every STEP_ERROR line is built
by contract.catalogue.error_line and read back by marked_json. Fast: no machine, no model."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from contract.catalogue import ERROR_PREFIX, EXIT_DETERMINISTIC, EXIT_RETRYABLE, marked_json
from steps.__main__ import main as steps_main
from steps.common import execute_step
from tasks.retry import exit_code_retryable


def failing(exc: BaseException):
    def body(ctx):
        raise exc
    return body


def step_error(out: str) -> dict:
    lines = [line for line in out.splitlines() if line.startswith(ERROR_PREFIX)]
    assert len(lines) == 1, out
    return marked_json(lines[0], ERROR_PREFIX)


@pytest.mark.parametrize("exc", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    torch.cuda.OutOfMemoryError("Tried to allocate 2.00 GiB"),  # known by its type, whatever it says
    RuntimeError("CUDA error: out of memory"),  # older torch and other allocators: the message says it
], ids=["OutOfMemoryError", "OutOfMemoryError-by-type", "RuntimeError"])
def test_out_of_memory_is_deterministic_and_never_retried(exc, tmp_path, capsys):
    code = execute_step("train", tiny_config(), tmp_path, failing(exc))
    err = step_error(capsys.readouterr().out)
    assert code == EXIT_DETERMINISTIC and not exit_code_retryable(code)
    assert err["retryable"] is False and err["step"] == "train"
    assert "out of memory" in err["message"] and "per_device_batch_size" in err["message"]  # what to do


def test_a_network_drop_is_retried(tmp_path, capsys):
    """The other side of the same rule: a transient failure keeps its retry."""
    code = execute_step("train", tiny_config(), tmp_path, failing(ConnectionResetError("reset by peer")))
    assert code == EXIT_RETRYABLE and exit_code_retryable(code)
    assert step_error(capsys.readouterr().out)["retryable"] is True


def test_a_config_the_machine_cannot_load_is_one_readable_step_error(tmp_path, capsys):
    bad = tmp_path / "run.yaml"
    bad.write_text("name: x\ntrain: {max_steps: -1}\n")
    code = steps_main(["train", "--config", str(bad), "--workdir", str(tmp_path / "work")])
    err = step_error(capsys.readouterr().out)
    assert code == EXIT_DETERMINISTIC and not exit_code_retryable(code)
    assert err == {"step": "train", "type": "ConfigError", "message": err["message"], "retryable": False}
    assert "max_steps" in err["message"]
