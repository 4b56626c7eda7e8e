"""steps/bootstrap.py and contract/remote_env.py: the build chosen, the driver rule, the messages and
exit codes of a machine that cannot be made usable (fast: nothing is installed here)."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from contract.catalogue import ERROR_PREFIX, EXIT_DETERMINISTIC
from contract.layout import REPO_ROOT, REQUIREMENTS
from contract.remote_env import (PINNED_TORCH, PINNED_TORCH_CUDA, TORCH_CUDA, pinned_torch, resolved_requirements,
                                 steps_python, venv_dir)
from steps import bootstrap

HEADER = """Fri Nov 27 15:10:59 2026
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 570.133.07             Driver Version: 570.133.07     CUDA Version: 12.8     |
|-----------------------------------------+------------------------+----------------------+
"""


def test_the_pinned_torch_and_the_cuda_it_needs_are_in_step():
    text = (REPO_ROOT / REQUIREMENTS).read_text()
    assert pinned_torch(text) == PINNED_TORCH and TORCH_CUDA[PINNED_TORCH] == PINNED_TORCH_CUDA == 13.0
    with pytest.raises(ValueError, match="must pin torch exactly"):
        pinned_torch("torch>=2.5\n")


def test_the_build_follows_machine_gpu():
    text = "torch==2.13.0\nonnxruntime>=1.22\nonnxruntime-extensions\nonnx>=1.18\n"
    assert resolved_requirements(text, "none") == text
    assert resolved_requirements(text, "required").splitlines() == [
        "torch==2.13.0", "onnxruntime-gpu>=1.22", "onnxruntime-extensions", "onnx>=1.18"]
    req = b"torch==2.13.0\n"
    assert venv_dir(req, "required").endswith("-cuda") and venv_dir(req, "none").endswith("-cpu")
    assert venv_dir(req, "none") != venv_dir(b"torch==2.13.0\nnumpy\n", "none")  # keyed by the requirements
    assert steps_python(req, "none") == f"../../{venv_dir(req, 'none')}/bin/python"  # from ~/qat/code
    with pytest.raises(ValueError, match="machine.gpu"):
        venv_dir(req, "maybe")


def test_nvidia_smi_header_and_the_driver_rule():
    assert bootstrap.parse_nvidia_smi(HEADER) == ("570.133.07", 12.8)
    with pytest.raises(bootstrap.EnvError, match="Driver Version"):
        bootstrap.parse_nvidia_smi("No devices were found\n")
    bootstrap.check_driver({"driver": "580.95.05", "driver_cuda": 13.0, "gpus": ["GPU 0"]}, "2.13.0")
    with pytest.raises(bootstrap.EnvError) as e:
        bootstrap.check_driver({"driver": "570.133.07", "driver_cuda": 12.8, "gpus": ["GPU 0"]}, "2.13.0+cu130")
    assert "driver 570.133.07 supports CUDA 12.8" in str(e.value) and "built for CUDA 13.0" in str(e.value)
    assert "cuda_max_good >= 13.0" in str(e.value) and not e.value.retryable


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """~/qat/code with our requirements; PATH holds only `bin/` (for a fake nvidia-smi) and the shell."""
    code = tmp_path / "qat" / "code"
    code.mkdir(parents=True)
    shutil.copy(REPO_ROOT / REQUIREMENTS, code / REQUIREMENTS)
    (tmp_path / "bin").mkdir()
    monkeypatch.chdir(code)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    return tmp_path


def fake_nvidia_smi(home: Path, text: str, code: int = 0) -> None:
    exe = home / "bin" / "nvidia-smi"
    exe.write_text(f"#!/bin/sh\n[ \"$1\" = -L ] && {{ echo 'GPU 0: NVIDIA H100 (UUID: GPU-1)'; exit 0; }}\n"
                   f"cat <<'EOF'\n{text}EOF\nexit {code}\n")
    exe.chmod(0o755)


def step_error(out: str) -> dict:
    lines = [ln for ln in out.splitlines() if ln.startswith(ERROR_PREFIX)]
    assert lines, out
    return json.loads(lines[-1][len(ERROR_PREFIX):])


@pytest.mark.parametrize("smi,want", [
    (None, "has no nvidia-smi"),
    (("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n", 9), "nvidia-smi failed (exit 9"),
    ((HEADER, 0), "driver 570.133.07 supports CUDA 12.8, but torch 2.13.0 is built for CUDA 13.0"),
])
def test_a_gpu_run_on_an_unusable_driver_fails_before_installing(machine, capsys, smi, want):
    if smi:
        fake_nvidia_smi(machine, *smi)
    assert bootstrap.main(["--gpu", "required"]) == EXIT_DETERMINISTIC
    err = step_error(capsys.readouterr().out)
    assert want in err["message"] and err["retryable"] is False and err["step"] == "setup"
    assert not (machine / "qat" / "venv").exists()  # nothing installed


def fake_venv(home: Path, gpu: str, report: dict) -> Path:
    """A venv whose python answers the check with `report` (as a CPU torch would on a GPU machine)."""
    venv = home / venv_dir((home / "qat" / "code" / REQUIREMENTS).read_bytes(), gpu)
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(f"#!/bin/sh\necho 'QAT_ENV_CHECK {json.dumps(report)}'\n")
    (venv / "bin" / "python").chmod(0o755)
    (venv / ".qat-ready").write_text("2.13.0\n")  # set up earlier: only the check runs
    return venv


CPU_TORCH = {"python": "3.11", "torch": "2.13.0+cpu", "torch_cuda": None, "cuda_available": False, "devices": 0,
             "onnxruntime": "1.22", "providers": ["CPUExecutionProvider"], "torchvision_visible": False}


def test_cuda_not_usable_from_torch_fails_naming_both_cuda_versions(machine, capsys):
    fake_nvidia_smi(machine, HEADER.replace("570.133.07", "580.95.05").replace("12.8", "13.0"))
    fake_venv(machine, "required", CPU_TORCH)
    assert bootstrap.main(["--gpu", "required"]) == EXIT_DETERMINISTIC
    msg = step_error(capsys.readouterr().out)["message"]
    assert "CUDA is not usable from torch on a machine rented for its GPU" in msg
    assert "driver 580.95.05 (supports CUDA 13.0, 1 GPU(s) listed)" in msg
    assert "torch 2.13.0+cpu is built for no CUDA (a CPU build)" in msg and "is_available() is False" in msg


def test_a_cpu_run_accepts_a_cpu_torch_and_refuses_a_leaking_torchvision(machine, capsys):
    fake_venv(machine, "none", CPU_TORCH)
    assert bootstrap.main(["--gpu", "none"]) == 0
    assert "torch=2.13.0+cpu" in capsys.readouterr().out
    shutil.rmtree(machine / "qat" / "venv")
    fake_venv(machine, "none", {**CPU_TORCH, "torchvision_visible": True})
    assert bootstrap.main(["--gpu", "none"]) == EXIT_DETERMINISTIC
    assert "the image's packages leak into it" in step_error(capsys.readouterr().out)["message"]


def test_bootstrap_imports_only_the_standard_library_and_contract():
    """It runs with the image's python before any of our dependencies exist."""
    import subprocess

    code = ("import sys; sys.path.insert(0, '.'); import steps.bootstrap; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('yaml', 'pydantic', 'torch', 'numpy', 'prefect', 'tasks', 'infra')); print(bad)")
    out = subprocess.run([sys.executable, "-I", "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                         env={"PATH": os.environ["PATH"]})
    assert out.stdout.strip() == "[]", out.stderr
