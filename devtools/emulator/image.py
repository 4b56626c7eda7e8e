"""The instance "image" of the emulator: a Python of its own, with packages built for another torch.

A real Vast.ai image (pytorch/pytorch:2.5.1-...) has its own Python (/opt/conda/bin) whose torchvision
and torchaudio are compiled for the image's torch; that Python is on PATH only through the image's
Docker ENV, which SSH sessions see only if onstart wrote it to /etc/environment (docs/REFERENCE.md
section 7). The emulator builds that image once per checkout and caches it under `.cache/emulator-image/`:

    venv/      `python -m venv` of the interpreter the emulator runs on (a separate environment: pip
               and none of the orchestrator's packages, as conda's python in pytorch images has pip),
               with a `torchvision` that fails on import the way one compiled for another torch does
               (`image_torchvision` knob)
    uv-cache/, pip-cache/  shared by every instance (hard links into each instance's venv): the
               first install on this machine downloads, later ones take seconds

`image_env()` is the image's container environment (its Docker ENV): what onstart sees. It holds
PATH (the image's python first), the caches and this machine's pip index settings (`pip config
list`) spelled for pip and uv, so that instances install from the same local wheel dirs as this
machine; only the endpoint/config differs from Vast.ai, the product's commands are the same.
"""
from __future__ import annotations

import fcntl
import functools
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

IMAGE_DIR = Path(__file__).resolve().parents[2] / ".cache" / "emulator-image"
from devtools.emulator.sshd import MINIMAL_PATH
TORCHVISION_VAR = "VAST_EMULATED_TORCHVISION"  # the `image_torchvision` knob, as the image sees it
TORCHVISION_MODES = ("abi", "no_video_reader", "absent")
_VERSION = "2"  # bump when the layout below changes: the cached image is rebuilt

# The image's torchvision 0.20.1 was built for its torch 2.5.1. Imported next to another torch it
# fails the way such a build does (the operator its C++ extension registers is missing), or it lacks
# `io.VideoReader` (what datasets 4.4.1 imported unguarded, docs/REFERENCE.md section 1b).
_TORCHVISION = '''"""Emulator image: torchvision 0.20.1, compiled for torch 2.5.1 (devtools/emulator/image.py)."""
import functools
import os

__version__ = "0.20.1"
_mode = os.environ.get("{var}", "abi")
if _mode == "absent":
    raise ModuleNotFoundError("No module named 'torchvision'", name="torchvision")
if _mode == "abi":
    raise RuntimeError("operator torchvision::nms does not exist (torchvision 0.20.1 was compiled for "
                       "torch 2.5.1: its C++ extension does not load with another torch)")
'''
_TORCHVISION_IO = "# no VideoReader here (torchvision >= 0.26 dropped it)\n"
_METADATA = "Metadata-Version: 2.1\nName: torchvision\nVersion: 0.20.1\nRequires-Dist: torch==2.5.1\n"


def _site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def ensure_image() -> Path:
    """Build the cached image once (a file lock serializes concurrent emulators); returns its venv."""
    IMAGE_DIR.mkdir(parents=True, exist_ok=True)
    venv, stamp = IMAGE_DIR / "venv", IMAGE_DIR / "venv" / ".emulator-image"
    with open(IMAGE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists() and stamp.read_text() == _VERSION:
            return venv
        base = getattr(sys, "_base_executable", sys.executable)  # not the orchestrator's venv
        subprocess.run([base, "-m", "venv", "--clear", str(venv)], check=True, capture_output=True)
        site = _site_packages(venv)
        (site / "torchvision" / "io").mkdir(parents=True, exist_ok=True)
        (site / "torchvision" / "__init__.py").write_text(_TORCHVISION.format(var=TORCHVISION_VAR))
        (site / "torchvision" / "io" / "__init__.py").write_text(_TORCHVISION_IO)
        (site / "torchvision-0.20.1.dist-info").mkdir(exist_ok=True)
        (site / "torchvision-0.20.1.dist-info" / "METADATA").write_text(_METADATA)
        (site / "torchvision-0.20.1.dist-info" / "INSTALLER").write_text("conda\n")
        stamp.write_text(_VERSION)
    return venv


_PIP_KEYS = ("index-url", "extra-index-url", "find-links", "cert")
# This machine's TLS trust and proxy: how it reaches the package registries (the image's own CA bundle
# and network on Vast.ai)
_PASSED = ("SSL_CERT_FILE", "SSL_CERT_DIR", "HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "https_proxy", "http_proxy",
           "no_proxy")


@functools.lru_cache(maxsize=1)
def pip_settings() -> dict[str, list[str]]:
    """This machine's pip settings (`pip config list`, then PIP_* variables): index-url,
    extra-index-url, find-links (each a list of locations) and cert (the CA bundle)."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    found: dict[str, list[str]] = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]
        if name in _PIP_KEYS:
            found[name] = value.strip().strip("'\"").split()
    for name in _PIP_KEYS:
        env = os.environ.get("PIP_" + name.upper().replace("-", "_"))
        if env:
            found[name] = env.split()
    return found


def image_env(torchvision: str = "abi") -> dict[str, str]:
    """The image's container environment (Docker ENV): what onstart sees, not what SSH sessions see."""
    venv = ensure_image()
    env = {"PATH": f"{venv / 'bin'}:{MINIMAL_PATH}",
           TORCHVISION_VAR: torchvision,
           "UV_CACHE_DIR": str(IMAGE_DIR / "uv-cache"), "UV_LINK_MODE": "hardlink",
           "PIP_CACHE_DIR": str(IMAGE_DIR / "pip-cache"),
           # pip's rule (the best version across every index and link dir), so that a local build such as
           # 2.13.0+cpu in a find-links dir wins as it does for pip on this machine
           "UV_INDEX_STRATEGY": "unsafe-best-match"}
    pip = pip_settings()
    if pip.get("index-url"):
        env["UV_INDEX_URL"] = env["PIP_INDEX_URL"] = pip["index-url"][0]
    if pip.get("extra-index-url"):
        env["UV_EXTRA_INDEX_URL"] = env["PIP_EXTRA_INDEX_URL"] = " ".join(pip["extra-index-url"])
    if pip.get("cert"):
        env["SSL_CERT_FILE"] = env["PIP_CERT"] = pip["cert"][0]
    env.update({k: os.environ[k] for k in _PASSED if os.environ.get(k)})
    if pip.get("find-links"):
        env["UV_FIND_LINKS"] = ",".join(pip["find-links"])
        env["PIP_FIND_LINKS"] = " ".join(pip["find-links"])
    return env


NVIDIA_SMI_MODES = ("ok", "absent", "fail")
# A driver release of the branch that supports each CUDA version (as Vast offers list them): what the
# `driver_cuda` knob's nvidia-smi prints as its driver version
DRIVER_FOR_CUDA = {11.8: "520.61.05", 12.1: "530.30.02", 12.2: "535.183.01", 12.4: "550.127.05",
                   12.6: "560.35.03", 12.8: "570.133.07", 13.0: "580.95.05"}
_NVIDIA_SMI = '''#!/bin/bash
# Emulator stand-in for the host's nvidia-smi (devtools/emulator/image.py): the offer's driver and CUDA.
if [ "$1" = "-L" ]; then
{gpu_lines}  exit 0
fi
echo "$(date '+%a %b %e %H:%M:%S %Y')"
echo "+-----------------------------------------------------------------------------------------+"
echo "| NVIDIA-SMI {driver:<22}Driver Version: {driver:<15}CUDA Version: {cuda:<9}|"
echo "|-----------------------------------------+------------------------+----------------------+"
echo "| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |"
'''
_NVIDIA_SMI_FAIL = '''#!/bin/bash
echo "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure that the latest NVIDIA driver is installed and running."
exit 9
'''


def install_nvidia_smi(bin_dir: Path, gpu_name: str, num_gpus: int, driver: str, cuda: float,
                       mode: str = "ok", driver_cuda: Optional[float] = None) -> None:
    """The host's nvidia-smi as the container sees it (`bin_dir`: its /usr/bin stand-in), printing the
    offer's driver version and the CUDA version it supports (`cuda_max_good`); `nvidia_smi` knob:
    `absent` (no GPU passed through), `fail` (the driver does not answer); `driver_cuda` knob: the
    host's driver is older than its offer said (it supports only that CUDA)."""
    if driver_cuda is not None:
        cuda = float(driver_cuda)
        driver = DRIVER_FOR_CUDA.get(round(cuda, 1), f"{int(cuda * 40)}.00.00")
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / "nvidia-smi"
    if mode == "absent":
        path.unlink(missing_ok=True)
        return
    lines = "".join(f'  echo "GPU {i}: NVIDIA {gpu_name} (UUID: GPU-0000000{i}-emul-0000-0000-000000000000)"\n'
                    for i in range(int(num_gpus)))
    text = _NVIDIA_SMI_FAIL if mode == "fail" else _NVIDIA_SMI.format(gpu_lines=lines, driver=driver, cuda=f"{cuda:.1f}")
    path.write_text(text)
    path.chmod(0o755)
