"""The real stack the chaos bench and the teardown/secrets tests drive: a Prefect server, the Vast.ai
emulator (real sshd instances) and a Runner process serving the `qat` flow, so that flow runs live in
their own processes where cancellation, SIGTERM and SIGKILL behave as in production.

    with Stack(root) as stack:
        run_id = stack.submit(overrides={...})
        stack.wait_final(run_id)

Every process is started here and ended here, by its own pid.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Optional

import psutil

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
DEPLOYMENT = "qat/chaos"


def wait_for(cond: Callable[[], Any], timeout: float, every: float = 0.5, what: str = "condition") -> Any:
    """Poll cond() until it returns something truthy; TimeoutError naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def _free_port() -> int:
    from infra.emulator.sshd import free_port

    return free_port()


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3):
            return True
    except Exception:
        return False


def _stop(proc: Optional[subprocess.Popen], grace: float = 20.0) -> None:
    """SIGTERM the process we started (and its children), SIGKILL what is left after `grace` s."""
    if proc is None or proc.poll() is not None:
        return
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        kids = []
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    for k in kids:
        try:
            k.kill()
        except psutil.Error:
            pass


class Stack:
    """Prefect server + emulator + runner under `root` (logs in root/logs, runs in root/runs).

    `env`: extra environment for the runner (and so for every flow run), e.g. HF_TOKEN."""

    def __init__(self, root: Path, api_key: str = "vastkey-chaos-0000", env: Optional[dict] = None,
                 heartbeat_s: int = 30, runner_limit: int = 2):
        self.root = Path(root)
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        self.api_key, self.extra_env, self.heartbeat_s = api_key, dict(env or {}), heartbeat_s
        self.runner_limit = runner_limit
        self.port = _free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.runs_dir = self.root / "runs"
        self.server: Optional[subprocess.Popen] = None
        self.runner: Optional[subprocess.Popen] = None
        self.runner_log: Optional[Path] = None
        self.runner_generation = 0
        self.emu = None

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
            "QAT_RUNNER_LIMIT": str(getattr(self, "runner_limit", 2)),
        })
        env.update(self.extra_env)
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
        from infra.emulator.testing import EmulatorProcess

        self.emu = EmulatorProcess(state_dir=self.root / "emulator", api_key=self.api_key).start()
        log = open(self.root / "logs" / "prefect-server.log", "ab")
        self.server = subprocess.Popen([str(Path(PY).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                                        "--port", str(self.port), "--no-ui"], cwd=REPO, env=self.server_env(),
                                       stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        wait_for(lambda: self.server.poll() is not None or _http_ok(self.api_url + "/health"), 180, 1,
                 "the Prefect server to answer")
        if self.server.poll() is not None:
            raise RuntimeError(f"the Prefect server exited; see {self.root / 'logs' / 'prefect-server.log'}")
        self.start_runner()

    def start_runner(self) -> None:
        """A Runner process serving the qat flow as deployment qat/chaos (flow runs are its children)."""
        self.runner_generation += 1
        self.runner_log = self.root / "logs" / f"runner-{self.runner_generation}.log"
        log = open(self.runner_log, "ab")
        self.runner = subprocess.Popen([PY, str(Path(__file__).resolve()), "serve"], cwd=REPO, env=self.env(),
                                       stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        wait_for(lambda: self.runner.poll() is not None or self._deployment_id(), 180, 1, "the runner to serve qat")
        if self.runner.poll() is not None:
            raise RuntimeError(f"the runner exited; see {self.runner_log}")

    def close(self) -> None:
        _stop(self.runner)
        _stop(self.server)
        if self.emu is not None:
            self.emu.cleanup()

    # ---------------------------------------------------------------- Prefect
    def client(self):
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.api_url)

    def _deployment_id(self):
        try:
            with self.client() as c:
                return c.read_deployment_by_name(DEPLOYMENT).id
        except Exception:
            return None

    def submit(self, config: str = "tiny", overrides: Optional[dict] = None) -> str:
        """Create a flow run of the served deployment; returns its id (the instance label is qat-<id>)."""
        with self.client() as c:
            fr = c.create_flow_run_from_deployment(self._deployment_id(),
                                                   parameters={"config": config, "overrides": overrides or {}})
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
        if self.runner is None or self.runner.poll() is not None:
            return None
        try:
            kids = psutil.Process(self.runner.pid).children(recursive=True)
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
        self.runner.wait(timeout=10)
        self.runner = None

    # ---------------------------------------------------------------- emulator views
    def instances(self, run_id: str) -> list[dict]:
        """Ledger rows of the instances rented for this flow run (label qat-<run id>)."""
        return [r for r in self.emu.ledger()["instances"] if r["label"] == f"qat-{run_id}"]

    def live(self, run_id: str) -> list[dict]:
        return [r for r in self.instances(run_id) if r["ended_at"] is None]

    def runner_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted((self.root / "logs").glob("runner-*.log")))


def serve() -> None:
    """`python bench/stack.py serve`: the Runner process (flow runs execute in its children)."""
    import asyncio

    from prefect.deployments.runner import RunnerDeployment
    from prefect.runner import Runner

    # From the entrypoint, as a worker does (`python -m prefect.engine` per run): `qat.serve()` runs
    # the in-memory flow in a spawned child, where its parameters fail to validate (see CHAOS.md).
    runner = Runner(name="chaos", limit=int(os.environ.get("QAT_RUNNER_LIMIT", "2")))
    runner.add_deployment(RunnerDeployment.from_entrypoint("flows/qat.py:qat", name="chaos"))
    asyncio.run(runner.start())


if __name__ == "__main__":
    if sys.argv[1:] == ["serve"]:
        serve()
    else:
        sys.exit("usage: python bench/stack.py serve   (started by Stack; not meant to be run by hand)")
