"""The shell a rented machine's SSH session gets and the workload's own environment, against the
Vast.ai emulator (its instances behave as real ones do: devtools/emulator/README.md)."""
from __future__ import annotations

import os
import subprocess

import pytest

from infra.backends.vast import hostkeys
from infra.backends.vast.credentials import VastCredentials
from contract.config import load_config
from contract.layout import PUSHED_CODE, REMOTE_CODE, REPO_ROOT, REQUIREMENTS
from contract.remote_env import steps_python
from devtools.emulator.image import IMAGE_DIR
from infra.backends import registry as provision


pytestmark = pytest.mark.usefixtures("fast_polling")


def rent(emulator, tmp_path, label="qat-env"):
    c = load_config("tiny", {"machine.provision_timeout_s": 30, "machine.ssh_timeout_s": 30})
    lease = provision.acquire(c.machine, label, tmp_path, VastCredentials(emulator.api_key, emulator.url),
                              log=lambda m: None)
    return c, lease, provision.connect(lease, timeout=10)


def output(m, argv, **kw) -> tuple[int, str]:
    lines: list[str] = []
    code = m.run(argv, on_line=lines.append, check=False, **kw)
    return code, "\n".join(lines)


def test_onstart_makes_ssh_commands_run_with_the_image_environment(emulator, tmp_path):
    """Without the product's onstart a command would not run (auto-tmux) and python3 would not be
    the image's (minimal PATH): tests/test_emulator.py shows both."""
    c, lease, m = rent(emulator, tmp_path)
    try:
        code, out = output(m, ["sh", "-c", "command -v python3; echo $PATH"])
        assert code == 0 and out.splitlines()[0] == str(IMAGE_DIR / "venv" / "bin" / "python3")
    finally:
        m.close()
        provision.release(lease, VastCredentials(emulator.api_key, emulator.url))


def test_onstart_writes_the_environment_without_secrets(tmp_path):
    etc, home = tmp_path / "etc", tmp_path / "home"
    (etc / "ssh").mkdir(parents=True)
    home.mkdir()
    (etc / "ssh" / "ssh_host_ed25519_key.pub").write_text("ssh-ed25519 AAAA test\n")
    (etc / "environment").write_text("PATH=/old\n")
    env = {"HOME": str(home), "PATH": f"/opt/conda/bin:{os.environ['PATH']}", "VAST_EMULATED_ETC": str(etc),
           "CUDA_HOME": "/usr/local/cuda", "CONTAINER_API_KEY": "k1", "HF_TOKEN": "t1", "DB_PASSWORD": "p1",
           "AWS_SECRET_ACCESS_KEY": "s1"}
    script = hostkeys.onstart_script("ssh-ed25519 AAAAC3Nza test@qat")
    subprocess.run(["bash", "-c", script], env=env, check=False, capture_output=True, timeout=30)
    written = (etc / "environment").read_text()
    assert (home / ".no_auto_tmux").exists()
    assert f"PATH=/opt/conda/bin:{os.environ['PATH']}\n" in written and "CUDA_HOME=/usr/local/cuda\n" in written
    for secret in ("k1", "t1", "p1", "s1", "/old"):
        assert secret not in written
    assert not any(line.startswith(("HOME=", "PWD=", "SHLVL=")) for line in written.splitlines())


def test_setup_builds_a_venv_the_image_does_not_leak_into(emulator, tmp_path):
    """steps.bootstrap with the image's python: our venv (CPU build: tiny is a CPU run), the image's
    python untouched, and its torchvision (built for another torch) invisible from the venv."""
    def image_files() -> list[str]:  # byte-code caches aside: importing writes them
        return sorted(str(p) for p in (IMAGE_DIR / "venv" / "lib").rglob("*") if "__pycache__" not in p.parts)

    before = image_files()
    c, lease, m = rent(emulator, tmp_path)
    try:
        m.put(REPO_ROOT, REMOTE_CODE, include=PUSHED_CODE)
        code, out = output(m, [provision.python(lease, c.machine), "-m", "steps.bootstrap", "--gpu", "none"],
                           cwd=REMOTE_CODE, timeout=900)
        assert code == 0, out
        assert "torch=2.13.0+cpu" in out and "torchvision_visible=False" in out
        py = steps_python((REPO_ROOT / REQUIREMENTS).read_bytes(), "none")
        code, out = output(m, [py, "-c", "import torch, sys; print(sys.prefix); import torchvision"], cwd=REMOTE_CODE)
        assert code == 1 and "No module named 'torchvision'" in out and "/qat/venv/" in out
        code, out = output(m, ["python3", "-c", "import torchvision"])
        assert code == 1 and "torchvision::nms does not exist" in out  # the image's, still there
        # a second setup on the same machine reuses the venv
        code, out = output(m, ["python3", "-m", "steps.bootstrap", "--gpu", "none"], cwd=REMOTE_CODE, timeout=300)
        assert code == 0 and "is already set up" in out
    finally:
        m.close()
        provision.release(lease, VastCredentials(emulator.api_key, emulator.url))
    assert image_files() == before  # nothing installed into the image's python
