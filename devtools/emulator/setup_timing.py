"""How long setup (steps/bootstrap.py) takes on an emulated instance, first time and warm.

    python -m devtools.emulator.setup_timing [--cold] [--runs N] [--gpu none]

Runs the bootstrap as an instance does: the image's python (image.py), the image's environment
(shared caches, this machine's index settings), a throwaway home with the pushed code; each run
starts from no venv. `--cold`: empty package caches too (a first install on this machine). Prints
one line per run; nothing is written outside a temporary directory.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from contract.layout import PUSHED_CODE, REMOTE_CODE, REPO_ROOT
from devtools.emulator.image import image_env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cold", action="store_true", help="empty uv and pip caches for each run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--gpu", default="none")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="setup-timing-") as tmp:
        home = Path(tmp) / "home"
        code = home / REMOTE_CODE
        code.mkdir(parents=True)
        for name in PUSHED_CODE:
            src = REPO_ROOT / name
            (shutil.copytree if src.is_dir() else shutil.copy)(src, code / name)
        for i in range(args.runs):
            env = {"HOME": str(home), **image_env()}
            if args.cold:
                env["UV_CACHE_DIR"], env["PIP_CACHE_DIR"] = f"{tmp}/uv-{i}", f"{tmp}/pip-{i}"
            shutil.rmtree(home / "qat" / "venv", ignore_errors=True)
            t0 = time.monotonic()
            done = subprocess.run(["python3", "-m", "steps.bootstrap", "--gpu", args.gpu], cwd=code, env=env,
                                  capture_output=True, text=True)
            took = time.monotonic() - t0
            print(f"{'cold' if args.cold else 'warm'} run {i + 1}: exit {done.returncode}, {took:.1f} s", flush=True)
            if done.returncode:
                print(done.stdout[-1500:], done.stderr[-1500:])


if __name__ == "__main__":
    main()
