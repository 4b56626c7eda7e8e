"""The throwaway stack of the chaos bench and the slow tests: a Prefect server, the Vast.ai emulator
(real sshd instances) and a Runner serving the `qat` flow instead of a worker, everything under one
root, on free ports, so that flow runs live in their own processes where cancellation, SIGTERM and
SIGKILL behave as in production. As in production, the `reap` flow is served apart, by a second
Runner process (deployment reap/reaper, no schedule: the caller triggers it with
`stack.trigger_reaper()`), which survives `kill_runner()`:

    with Stack(root) as stack:
        run_id = stack.submit(overrides={...})
        stack.wait_final(run_id)

The two Runner processes are this module run by `Stack` itself (never by hand):

    python -m devtools.throwaway_stack serve           # qat/chaos
    python -m devtools.throwaway_stack serve-reaper    # reap/reaper

Every service is started and stopped by devtools/services.py, so that no process of the stack can
outlive `close()`. The demo's long-lived stack is devtools/stack.py.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import psutil

from .emulator.sshd import free_port
from .services import BIN, PY, Service, answers, start_service, stop_service, wait_for

DEPLOYMENT = "qat/chaos"
REAPER_DEPLOYMENT = "reap/reaper"
SERVE = [PY, "-m", "devtools.throwaway_stack"]  # + serve / serve-reaper: this module's Runner processes


class Stack:
    """Prefect server + emulator + runner under `root` (logs in root/logs, runs in root/runs).

    `env`: extra environment for the runner (and so for every flow run), e.g. HF_TOKEN.
    `secret_blocks`: the Vast.ai key and HF_TOKEN are saved as the Prefect Secret blocks the README
    recommends (vast-api-key, hf-token) instead of reaching the runner's environment.
    After close(), `survivors` lists the pids of its processes that outlived it (expected: none)."""

    def __init__(self, root: Path, api_key: str = "vastkey-chaos-0000", env: Optional[dict] = None,
                 heartbeat_s: int = 30, runner_limit: int = 2, reaper: bool = True, secret_blocks: bool = False):
        self.root = Path(root)
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        self.api_key, self.extra_env, self.heartbeat_s = api_key, dict(env or {}), heartbeat_s
        self.runner_limit, self.secret_blocks = runner_limit, secret_blocks
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.runs_dir = self.root / "runs"
        self.server: Optional[Service] = None
        self.runner: Optional[Service] = None
        self.runner_log: Optional[Path] = None
        self.runner_generation = 0
        self.reaper: Optional[Service] = None   # the Runner serving reap/reaper (None: not started)
        self.with_reaper = reaper
        self.emu = None
        self.survivors: list[int] = []

    # ---------------------------------------------------------------- lifecycle
    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update({
            "PREFECT_HOME": str(self.root / "prefect-home"), "PREFECT_API_URL": self.api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_ENABLED": "false",
            "PREFECT_RUNNER_POLL_FREQUENCY": "2", "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.5",
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(self.heartbeat_s),
            "VAST_API_KEY": self.api_key, "VAST_URL": self.emu.url if self.emu else "",
            "QAT_RUNS_DIR": str(self.runs_dir), "PYTHONUNBUFFERED": "1",
            "QAT_RUNNER_LIMIT": str(self.runner_limit),
        })
        env.update(self.extra_env)
        if self.secret_blocks:  # the flows must find them in the Secret blocks
            env.pop("VAST_API_KEY", None)
            env.pop("HF_TOKEN", None)
        return env

    def server_env(self) -> dict:
        """The Prefect server needs no credential: it gets none."""
        return {k: v for k, v in self.env().items() if k not in ("VAST_API_KEY", "HF_TOKEN", *self.extra_env)}

    def __enter__(self) -> "Stack":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        from devtools.emulator.testing import EmulatorProcess

        self.emu = EmulatorProcess(state_dir=self.root / "emulator", api_key=self.api_key).start()
        log = self.root / "logs" / "prefect-server.log"
        for attempt in range(3):  # its port was free when picked: another process may have taken it since
            start = log.stat().st_size if log.exists() else 0
            self.server = start_service("prefect-server", [str(BIN / "prefect"), "server", "start", "--host",
                                                           "127.0.0.1", "--port", str(self.port), "--no-ui"],
                                        log, env=self.server_env())
            wait_for(lambda: not self.server.alive() or answers(self.api_url + "/health"), 180, 1,
                     "the Prefect server to answer")
            if self.server.alive():
                break
            with open(log, "rb") as f:
                f.seek(start)
                taken = b"already in use" in f.read().lower()  # Prefect's own check, or uvicorn's bind
            if not taken or attempt == 2:
                raise RuntimeError(f"the Prefect server exited; see {log}")
            self.port = free_port()
            self.api_url = f"http://127.0.0.1:{self.port}/api"
        self._gpu_limit()
        if self.secret_blocks:
            self._save_secret_blocks()
        if self.with_reaper:  # started first: both runners boot at once
            self.reaper = start_service("reaper", [*SERVE, "serve-reaper"],
                                        self.root / "logs" / "reaper.log", env=self.env())
        self.start_runner()
        if self.reaper is not None:
            wait_for(lambda: not self.reaper.alive() or self._deployment_id(REAPER_DEPLOYMENT), 180, 1,
                     "the reaper runner to serve reap")
            if not self.reaper.alive():
                raise RuntimeError(f"the reaper runner exited; see {self.reaper.log}")

    def _gpu_limit(self) -> None:
        """The emulated account may run as many machines as the runner runs flows: without this limit
        the flow would create one of a single slot and serialize the scenarios."""
        from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

        from tasks.rental import GPU_LIMIT

        with self.client() as client:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=self.runner_limit))

    def _save_secret_blocks(self) -> None:
        """Secret blocks, saved through the API by a short-lived process (never a command line)."""
        values = {"vast-api-key": self.api_key, "hf-token": self.extra_env.get("HF_TOKEN")}
        save = ("import os; from prefect.blocks.system import Secret; "
                "Secret(value=os.environ['QAT_SECRET_VALUE']).save(os.environ['QAT_SECRET_NAME'], overwrite=True)")
        for name, value in values.items():
            if value:
                subprocess.run([PY, "-c", save], env={**self.env(), "QAT_SECRET_NAME": name, "QAT_SECRET_VALUE": value},
                               check=True, capture_output=True, timeout=120)

    def start_runner(self) -> None:
        """A Runner process serving the qat flow as deployment qat/chaos (flow runs are its children)."""
        self.runner_generation += 1
        self.runner_log = self.root / "logs" / f"runner-{self.runner_generation}.log"
        self.runner = start_service("runner", [*SERVE, "serve"], self.runner_log, env=self.env())
        wait_for(lambda: not self.runner.alive() or self._deployment_id(), 180, 1, "the runner to serve qat")
        if not self.runner.alive():
            raise RuntimeError(f"the runner exited; see {self.runner_log}")

    def close(self) -> None:
        for svc in (self.runner, self.reaper, self.server):
            if svc is not None:
                self.survivors += stop_service(svc)
        if self.emu is not None:
            self.emu.cleanup()

    # ---------------------------------------------------------------- Prefect
    def client(self):
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.api_url)

    def _deployment_id(self, name: str = DEPLOYMENT):
        try:
            with self.client() as c:
                return c.read_deployment_by_name(name).id
        except Exception:
            return None

    def submit(self, config: str = "tiny", overrides: Optional[dict] = None) -> str:
        """Create a flow run of the served deployment; returns its id (the instance label ends with it)."""
        with self.client() as c:
            fr = c.create_flow_run_from_deployment(self._deployment_id(),
                                                   parameters={"config": config, "overrides": overrides or {}})
        return str(fr.id)

    def trigger_reaper(self, max_age_hours: float = 24.0) -> str:
        """Create a run of the deployed reaper (what its schedule does in production); returns its id."""
        with self.client() as c:
            fr = c.create_flow_run_from_deployment(self._deployment_id(REAPER_DEPLOYMENT),
                                                   parameters={"max_age_hours": max_age_hours})
        return str(fr.id)

    def flow_run(self, run_id: str):
        from uuid import UUID

        with self.client() as c:
            return c.read_flow_run(UUID(run_id))

    def state(self, run_id: str):
        return self.flow_run(run_id).state

    def wait_final(self, run_id: str, timeout: float = 900):
        return wait_for(lambda: (s := self.state(run_id)) is not None and s.is_final() and s, timeout, 1,
                        f"flow run {run_id} to end")

    def cancel(self, run_id: str) -> None:
        from uuid import UUID

        from prefect.states import Cancelling

        with self.client() as c:
            c.set_flow_run_state(UUID(run_id), Cancelling(message="cancelled by the chaos bench"), force=True)

    def logs(self, run_id: str) -> list[str]:
        from uuid import UUID

        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        out, offset = [], 0
        with self.client() as c:
            while True:
                page = c.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[UUID(run_id)])), limit=200,
                                   offset=offset)
                out += [f"{r.name}: {r.message}" for r in page]
                if len(page) < 200:
                    return out
                offset += 200

    def task_states(self, run_id: str) -> list[tuple[str, str]]:
        """(task run name, state type) in start order."""
        from uuid import UUID

        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        with self.client() as c:
            runs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(run_id)])))
        runs = sorted(runs, key=lambda r: r.start_time or r.created)
        return [(r.name, r.state.type.value if r.state else "NONE") for r in runs]

    def artifacts(self, run_id: str) -> list:
        from uuid import UUID

        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        with self.client() as c:
            return c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(run_id)])))

    # ---------------------------------------------------------------- processes
    def flow_pid(self, run_id: str) -> Optional[int]:
        """The pid of the process executing this flow run (a child of the runner)."""
        runner = self.runner.process() if self.runner is not None else None
        if runner is None:
            return None
        try:
            kids = runner.children(recursive=True)
        except psutil.Error:
            return None
        for p in kids:
            try:
                if p.environ().get("PREFECT__FLOW_RUN_ID") == run_id:
                    return p.pid
            except psutil.Error:
                continue
        return None

    def kill_runner(self) -> None:
        """SIGKILL the runner and every flow-run process under it (a lost worker machine).

        All are frozen (SIGSTOP) first: killed one by one, the survivors could react to the first
        death (a flow process sent SIGTERM by its dying parent runs its finally and destroys the
        machine within ~0.1 s), which a machine losing power never allows.
        """
        runner = psutil.Process(self.runner.pid)
        procs = [runner, *runner.children(recursive=True)]
        for sig in ("suspend", "kill"):
            for p in procs:
                try:
                    getattr(p, sig)()
                except psutil.Error:
                    pass
        self.runner.proc.wait(timeout=10)
        self.runner = None

    # ---------------------------------------------------------------- emulator views
    def instances(self, run_id: str) -> list[dict]:
        """Ledger rows of the instances rented for this flow run (label qat-<installation id>-<run id>)."""
        return [r for r in self.emu.ledger()["instances"]
                if (r["label"] or "").startswith("qat-") and (r["label"] or "").endswith(f"-{run_id}")]

    def live(self, run_id: str) -> list[dict]:
        return [r for r in self.instances(run_id) if r["ended_at"] is None]

    def runner_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted((self.root / "logs").glob("runner-*.log")))


def serve() -> None:
    """The Runner process of `Stack` (flow runs execute in its children)."""
    import asyncio

    from prefect.deployments.runner import RunnerDeployment
    from prefect.runner import Runner

    # From the entrypoint, as a worker does (`python -m prefect.engine` per run): `qat.serve()` runs
    # the in-memory flow in a spawned child, where its parameters fail to validate (see CHAOS.md).
    runner = Runner(name="chaos", limit=int(os.environ.get("QAT_RUNNER_LIMIT", "2")))
    runner.add_deployment(RunnerDeployment.from_entrypoint("flows/qat.py:qat", name="chaos"))
    asyncio.run(runner.start())


def serve_reaper() -> None:
    """The reaper's own Runner process (a second worker, as prefect.yaml puts reap on qat-reaper)."""
    import asyncio

    from prefect.deployments.runner import RunnerDeployment
    from prefect.runner import Runner

    runner = Runner(name="chaos-reaper", limit=1)
    runner.add_deployment(RunnerDeployment.from_entrypoint("flows/reap.py:reap", name="reaper"))
    asyncio.run(runner.start())


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m devtools.throwaway_stack",
                                 description="The Runner processes of Stack (started by it, not by hand).")
    ap.add_argument("command", choices=("serve", "serve-reaper"))
    args = ap.parse_args(argv)
    if args.command == "serve-reaper":
        serve_reaper()
    else:
        serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
