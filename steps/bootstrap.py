"""Set up the steps' own Python environment on the machine, then prove it usable.

    cd ~/qat/code && python3 -m steps.bootstrap --gpu required|none

Runs with the image's python before our venv exists, so it uses the standard library only, and it
never installs anything into that python (its packages are built for the image's torch). In order:

1. `--gpu required`: read the host's `nvidia-smi` (driver version, the CUDA version it supports, the
   GPUs) and refuse a driver too old for the pinned torch build, before installing gigabytes.
2. Make `~/qat/venv/<requirements hash>-<cuda|cpu>/` (`python -m venv`, then uv into it, then uv
   installs requirements-remote.txt: onnxruntime-gpu instead of onnxruntime for the cuda build;
   contract/remote_env.py). Skipped when that venv already passed its checks.
3. Inside the venv: torch and onnxruntime import, the image's torchvision is not visible, and with
   `--gpu required` CUDA is usable from torch (`torch.cuda.is_available()`, at least one device).

Exit 0 when usable, after a `GPUS {"nvidia_smi": N, "torch": M}` line: the GPUs nvidia-smi lists (also
with `--gpu none`, where a host lists them: the emulator's N-GPU offers) and those torch sees.
Otherwise a `STEP_ERROR {...}` line naming what was wrong (the driver's and torch's CUDA versions when
CUDA is the problem) and EXIT_DETERMINISTIC (3: a machine or config that will not get better; the flow
fails fast and destroys the machine) or EXIT_RETRYABLE (1: an install that may pass on a retry, e.g. a
network error). Facts in docs/REFERENCE.md section 7.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

from contract.catalogue import EXIT_DETERMINISTIC, EXIT_OK, EXIT_RETRYABLE, GPUS_PREFIX, error_line
from contract.layout import REMOTE_CODE, REQUIREMENTS
from contract.remote_env import (GPU_MODES, READY, TORCH_CUDA, build, pinned_torch, resolved_requirements,
                                 venv_dir)

UV = "uv==0.13.9"  # `uv pip install --excludes` (drops faster-whisper's onnxruntime for the cuda build)
CHECK = r"""
import importlib.util, json, sys
import torch, onnxruntime
print("QAT_ENV_CHECK " + json.dumps({
    "python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
    "cuda_available": torch.cuda.is_available(), "devices": torch.cuda.device_count(),
    "onnxruntime": onnxruntime.__version__, "providers": onnxruntime.get_available_providers(),
    "torchvision_visible": importlib.util.find_spec("torchvision") is not None}))
"""


class EnvError(RuntimeError):
    def __init__(self, message: str, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


def log(message: str) -> None:
    print(f"[setup] {message}", flush=True)


def parse_nvidia_smi(header: str) -> tuple[str, float]:
    """(driver version, CUDA version the driver supports) from plain `nvidia-smi` output."""
    driver = re.search(r"Driver Version:\s*([0-9][0-9.]*)", header)
    cuda = re.search(r"CUDA Version:\s*([0-9]+\.[0-9]+)", header)
    if not driver or not cuda:
        raise EnvError("nvidia-smi printed no 'Driver Version: ... CUDA Version: ...' header: cannot tell which "
                       f"CUDA this machine's driver supports (first line: {header.strip().splitlines()[:1]})")
    return driver.group(1), float(cuda.group(1))


def _run(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def read_gpu() -> dict:
    """The host's driver, the CUDA version it supports and its GPUs, from nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        raise EnvError("machine.gpu is 'required' but this machine has no nvidia-smi: no GPU or driver is passed "
                       "through to it; rent another machine, or set machine.gpu: none for a CPU run")
    header = _run([exe])
    if header.returncode != 0:
        first = (header.stdout + header.stderr).strip().splitlines()[:1]
        raise EnvError(f"machine.gpu is 'required' but nvidia-smi failed (exit {header.returncode}: {first}): the "
                       "GPU driver does not answer on this machine; rent another one")
    driver, cuda = parse_nvidia_smi(header.stdout)
    gpus = [line for line in _run([exe, "-L"]).stdout.splitlines() if line.startswith("GPU ")]
    return {"driver": driver, "driver_cuda": cuda, "gpus": gpus}


def listed_gpus() -> dict:
    """The GPUs nvidia-smi lists when it runs (no GPU, no driver: none); never fails the setup."""
    exe = shutil.which("nvidia-smi")
    try:
        out = _run([exe, "-L"]).stdout if exe else ""
    except (OSError, subprocess.SubprocessError):
        out = ""
    return {"gpus": [line for line in out.splitlines() if line.startswith("GPU ")]}


def check_driver(gpu: dict, torch_version: str) -> None:
    need = TORCH_CUDA.get(torch_version.split("+")[0])
    if need is None:
        raise EnvError(f"torch {torch_version} is pinned but contract/remote_env.py TORCH_CUDA does not say which "
                       "CUDA its build needs: add it there (and check machine.vast.min_cuda)")
    if gpu["driver_cuda"] < need:
        raise EnvError(f"driver {gpu['driver']} supports CUDA {gpu['driver_cuda']:.1f}, but torch {torch_version} is "
                       f"built for CUDA {need:.1f}: CUDA would not be usable (training would run on the CPU); "
                       f"rent a machine with cuda_max_good >= {need:.1f} (machine.vast.min_cuda)")


def install(venv: Path, requirements: str, gpu: str) -> None:
    """A fresh venv from the image's python, uv in it, then the requirements for this build."""
    log(f"creating {venv} with {sys.executable} (python {sys.version.split()[0]})")
    made = _run([sys.executable, "-m", "venv", "--clear", "--without-pip", str(venv)], timeout=600)
    if made.returncode != 0:
        raise EnvError(f"{sys.executable} -m venv failed: {(made.stderr or made.stdout).strip()[-400:]}; the image's "
                       "python cannot make a venv (Debian/Ubuntu: install python3-venv), or set machine.python "
                       "to one that can")
    py = str(venv / "bin" / "python")
    # uv into the venv by the image's pip (pip >= 22.3 installs into another interpreter's environment,
    # its own untouched): seconds faster than ensurepip; an image without such a pip gets ensurepip
    quiet = ["install", "--quiet", "--disable-pip-version-check", UV]
    if _run([sys.executable, "-m", "pip", "--python", py, *quiet], timeout=600).returncode != 0:
        _stream([py, "-m", "ensurepip", "--default-pip"], "bootstrapping pip in the venv")
        _stream([py, "-m", "pip", *quiet], "installing uv")
    (venv / "requirements.txt").write_text(resolved_requirements(requirements, gpu))
    argv = [py, "-m", "uv", "pip", "install", "--python", py, "-r", str(venv / "requirements.txt")]
    if build(gpu) == "cuda":  # onnxruntime-gpu provides the module; faster-whisper's onnxruntime would clash
        (venv / "excludes.txt").write_text("onnxruntime\n")
        argv += ["--excludes", str(venv / "excludes.txt")]
    _stream(argv, "installing requirements")


def _stream(argv: list[str], what: str) -> None:
    log(f"{what}: {' '.join(argv)}")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    for line in proc.stdout:
        print(line.rstrip(), flush=True)
        tail = (tail + [line.rstrip()])[-5:]
    if proc.wait() != 0:  # an index or network failure may pass on a retry
        raise EnvError(f"{what} failed (exit {proc.returncode}): {' | '.join(tail)}", retryable=True)


def check(venv: Path, gpu: str, gpu_info: Optional[dict]) -> dict:
    """Run the check inside the venv; raise EnvError when it is not usable for this run."""
    done = _run([str(venv / "bin" / "python"), "-c", CHECK], timeout=600)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("QAT_ENV_CHECK ")]
    if done.returncode != 0 or not lines:
        raise EnvError(f"the new environment does not import torch and onnxruntime: "
                       f"{(done.stderr or done.stdout).strip()[-600:]}")
    got = json.loads(lines[-1][len("QAT_ENV_CHECK "):])
    log("environment: " + ", ".join(f"{k}={v}" for k, v in got.items()))
    if got["torchvision_visible"]:
        raise EnvError("a torchvision is visible in the steps' venv although requirements-remote.txt does not "
                       "ask for one: the image's packages leak into it (they are built for another torch)")
    if build(gpu) == "cuda" and not (got["cuda_available"] and got["devices"] >= 1):
        drv = (f"driver {gpu_info['driver']} (supports CUDA {gpu_info['driver_cuda']:.1f}, {len(gpu_info['gpus'])} "
               "GPU(s) listed)") if gpu_info else "no driver information"
        built = f"CUDA {got['torch_cuda']}" if got["torch_cuda"] else "no CUDA (a CPU build)"
        raise EnvError(f"CUDA is not usable from torch on a machine rented for its GPU: {drv}; torch {got['torch']} is "
                       f"built for {built}; torch.cuda.is_available() is {got['cuda_available']}, "
                       f"{got['devices']} device(s). Training would run on the CPU: rent another machine "
                       f"(machine.vast.min_cuda), or set machine.gpu: none for a CPU run")
    return got


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m steps.bootstrap", description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", choices=GPU_MODES, required=True, help="machine.gpu of the run")
    args = ap.parse_args(argv)
    code_dir = Path.cwd()
    home = code_dir.parents[len(Path(REMOTE_CODE).parts) - 1]  # cwd is ~/qat/code
    try:
        text = (code_dir / REQUIREMENTS).read_bytes()
        try:
            torch_version = pinned_torch(text.decode())
        except ValueError as e:
            raise EnvError(str(e)) from None
        gpu_info = None
        if build(args.gpu) == "cuda":
            gpu_info = read_gpu()
            log(f"driver {gpu_info['driver']} supports CUDA {gpu_info['driver_cuda']:.1f}; {len(gpu_info['gpus'])} GPU(s)")
            check_driver(gpu_info, torch_version)
        venv = home / venv_dir(text, args.gpu)
        if (venv / READY).exists():
            log(f"{venv} is already set up for these requirements")
        else:
            install(venv, text.decode(), args.gpu)
        got = check(venv, args.gpu, gpu_info)
        (venv / READY).write_text(torch_version + "\n")
        print(GPUS_PREFIX + json.dumps({"nvidia_smi": len((gpu_info or listed_gpus())["gpus"]),
                                        "torch": int(got["devices"])}), flush=True)
        return EXIT_OK
    except EnvError as e:
        print(error_line("setup", "EnvError", str(e), e.retryable), flush=True)
        return EXIT_RETRYABLE if e.retryable else EXIT_DETERMINISTIC
    except subprocess.TimeoutExpired as e:
        print(error_line("setup", "TimeoutExpired", f"timed out: {e}", True), flush=True)
        return EXIT_RETRYABLE


if __name__ == "__main__":
    sys.exit(main())
