"""The demo's local stack: a Prefect server (with UI), the Vast.ai emulator (real sshd instances) and
process workers (qat, reaper), long-lived, driven from the shell.

    python -m devtools.stack up       # start it (reuses whatever is already running)
    python -m devtools.stack down     # stop it; no process of it is left behind
    python -m devtools.stack status
    python -m devtools.stack env      # its settings as `export` lines (scripts/demo.sh evals them)

`up`/`down` drive `LocalStack`: state in .prefect/ and .stack/ (pid files, logs, the emulator's state
and API key), the server's port from $PREFECT_SERVER_API_PORT (4200). It never serves real use: its
workers serve the demo pools only (qat-demo, qat-demo-reaper), the emulator listens where the demo
deployment's `VAST_URL` says and its key is saved in the Secret block the demo deployment names
(`VAST_API_KEY_BLOCK`), both read from prefect.yaml (devtools/deployments.py); the stack's own
environment carries no Vast.ai endpoint or key.

The chaos bench and the slow tests use a throwaway stack instead (devtools/throwaway_stack.py). Every
service is started and stopped by devtools/services.py, so that no process of the stack can outlive
`down`.
"""
from __future__ import annotations

import argparse
import os
import secrets
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

from tasks.secrets import EMULATOR_KEY_PREFIX

from .deployments import deployment, deployment_env
from .services import BIN, GRACE_S, PY, REPO, Service, answers, start_service, stop_service, wait_for

DEMO_DEPLOYMENTS = ("qat/demo", "reap/demo")  # what `make demo` registers (scripts/demo.sh)


class LocalStack:
    """The persistent demo stack: Prefect server (UI included), emulator, a process worker on the
    demo's pool (qat-demo) and, as in production, another on its own reaper pool (qat-demo-reaper)."""

    SERVICES = ("prefect-server", "emulator", "worker", "reaper-worker")  # start order; stopped in reverse

    def __init__(self, root: Path = REPO, stack_dir: Optional[Path] = None):
        self.root = Path(root)
        self.stack_dir = Path(stack_dir or self.root / ".stack")
        self.server_port = int(os.environ.get("PREFECT_SERVER_API_PORT", "4200"))
        demo = deployment_env(DEMO_DEPLOYMENTS[0])  # the code's prefect.yaml, wherever the state lives
        self.vast_url, self.secret_block = demo["VAST_URL"], demo["VAST_API_KEY_BLOCK"]
        self.emulator_port = urlsplit(self.vast_url).port
        self.pools = {name: deployment(name)["work_pool"]["name"] for name in DEMO_DEPLOYMENTS}
        self.key_file = self.stack_dir / "emulator-api-key"

    def env(self) -> dict[str, str]:
        """The stack's settings, for its services and for the shell that drives it (`env`). No Vast.ai
        endpoint or key: the demo deployments carry theirs (prefect.yaml job variables)."""
        ui = f"http://127.0.0.1:{self.server_port}"
        return {
            "PREFECT_HOME": str(self.root / ".prefect"), "PREFECT_SERVER_API_PORT": str(self.server_port),
            "PREFECT_API_URL": f"{ui}/api", "PREFECT_UI_URL": ui,
            "QAT_RUNS_DIR": os.environ.get("QAT_RUNS_DIR", str(self.root / "runs")),
            "STACK_DIR": str(self.stack_dir),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    def service_env(self) -> dict[str, str]:
        """What the stack's processes get: this shell's environment less any Vast.ai endpoint or key
        (a worker passes its environment to every flow run it starts), plus the stack's settings."""
        env = {k: v for k, v in os.environ.items() if k not in ("VAST_URL", "VAST_API_KEY", "VAST_API_KEY_BLOCK")}
        return {**env, **self.env()}

    def _pid_file(self, name: str) -> Path:
        return self.stack_dir / f"{name}.pid"

    def service(self, name: str) -> Optional[Service]:
        return Service.from_file(self._pid_file(name))

    def start(self, name: str, argv: list[str], env: Optional[dict] = None) -> Service:
        """Start a service unless it already runs; its pid file records it for `down`."""
        running = self.service(name)
        if running is not None and running.alive():
            print(f"    {name} already running (pid {running.pid})")
            return running
        svc = start_service(name, argv, self.stack_dir / "logs" / f"{name}.log",
                            env={**self.service_env(), **(env or {})})
        self._pid_file(name).write_text(svc.to_json())
        print(f"    {name} started (pid {svc.pid}, log {svc.log})")
        return svc

    def _wait_up(self, svc: Service, url: str, what: str, timeout: float) -> None:
        wait_for(lambda: not svc.alive() or answers(url), timeout, 1, what)
        if not svc.alive():
            raise SystemExit(f"{what} exited; see {svc.log}")

    def up(self) -> None:
        env = self.env()
        os.environ.update(env)  # for the Prefect client below and the CLI calls
        (self.stack_dir / "logs").mkdir(parents=True, exist_ok=True)
        Path(env["PREFECT_HOME"]).mkdir(mode=0o700, parents=True, exist_ok=True)
        Path(env["PREFECT_HOME"]).chmod(0o700)
        print(f"==> Prefect server ({env['PREFECT_UI_URL']})")
        svc = self.start("prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                            "--port", str(self.server_port)])
        self._wait_up(svc, env["PREFECT_API_URL"] + "/health", "the Prefect server", 120)
        print(f"==> Vast.ai emulator ({self.vast_url})")
        if not self.key_file.is_file():
            self.key_file.write_text(EMULATOR_KEY_PREFIX + secrets.token_hex(16) + "\n")
        self.key_file.chmod(0o600)
        key = self.key_file.read_text().strip()
        svc = self.start("emulator", [PY, "-m", "devtools.emulator", "--port", str(self.emulator_port),
                                      "--state-dir", str(self.stack_dir / "emulator")],
                         env={"VAST_EMULATOR_KEY": key})  # the key stays off the command line
        self._wait_up(svc, self.vast_url + "/api/v0/users/current", "the Vast.ai emulator", 60)
        print(f"==> Prefect Secret {self.secret_block!r}, work pools {', '.join(self.pools.values())}, "
              "concurrency limit")
        self.prefect_setup(key)
        prefect = str(BIN / "prefect")
        print("==> worker")
        self.start("worker", [prefect, "worker", "start", "--pool", self.pools["qat/demo"]])
        print("==> reaper worker")
        self.start("reaper-worker", [prefect, "worker", "start", "--pool", self.pools["reap/demo"]])

    def prefect_setup(self, key: str) -> None:
        """On the Prefect server of PREFECT_API_URL: the emulator key in the demo's own Secret block,
        the demo's work pools, the GPU limit. Nothing of real use (vast-api-key, qat-pool) is touched."""
        from prefect.blocks.system import Secret

        Secret(value=key).save(self.secret_block, overwrite=True)
        prefect = str(BIN / "prefect")
        todo = [(["work-pool", "inspect", pool], ["work-pool", "create", pool, "--type", "process"])
                for pool in self.pools.values()]
        for inspect, create in todo + [(["gcl", "inspect", "vast-gpus"], ["gcl", "create", "vast-gpus", "--limit", "1"])]:
            if subprocess.run([prefect, *inspect], capture_output=True).returncode != 0:
                subprocess.run([prefect, *create], capture_output=True, check=True)

    def down(self, grace: float = GRACE_S) -> list[int]:
        """Stop worker, emulator, server (in that order); returns the pids that survived (none)."""
        survivors = []
        for name in reversed(self.SERVICES):
            svc = self.service(name)
            if svc is not None:
                left = stop_service(svc, grace)
                print(f"    {name} stopped (pid {svc.pid})" if not left else
                      f"    {name}: processes {left} survived SIGKILL", flush=True)
                survivors += left
                if not left:
                    self._pid_file(name).unlink(missing_ok=True)
        return survivors

    def status(self) -> dict[str, Optional[int]]:
        """name -> pid of each running service (None: stopped)."""
        out = {}
        for name in self.SERVICES:
            svc = self.service(name)
            out[name] = svc.pid if svc is not None and svc.alive() else None
        return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m devtools.stack", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=("up", "down", "status", "env"))
    args = ap.parse_args(argv)
    stack = LocalStack()
    if args.command == "up":
        stack.up()
    elif args.command == "down":
        return 1 if stack.down() else 0
    elif args.command == "status":
        for name, pid in stack.status().items():
            print(f"{name}: running (pid {pid})" if pid else f"{name}: stopped")
    else:
        print("\n".join(f"export {k}={shlex.quote(v)}" for k, v in stack.env().items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
