"""Pointing this test process's Prefect client at one server, then at another, without losing events.

Prefect keeps one events worker per process for "a running server", whatever PREFECT_API_URL says
(its cache key is the client class, not the URL). A worker started while a test pointed at one server
keeps sending there after the test has moved on: a later harness's task runs never reach its server
(their states arrive as events), and the harness's drain at exit waits on it for ever. So each switch
retires the workers it started, while their server still answers.
"""
from __future__ import annotations

import asyncio
import re
import time
from contextlib import contextmanager
from typing import Callable

RETIRE_TIMEOUT_S = 30


def retire_prefect_workers(timeout: float = RETIRE_TIMEOUT_S) -> None:
    """Flush and stop this process's events and API-log workers; the next emit starts fresh ones
    that read the settings in force then."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    EventsWorker.drain_all(timeout=timeout)
    APILogWorker.drain_all(timeout=timeout)


@contextmanager
def prefect_api(url: str, **settings):
    """PREFECT_API_URL (and any other Prefect setting given by name) for the block, its workers retired after."""
    import prefect.settings

    updates = {prefect.settings.PREFECT_API_URL: url}
    updates.update({getattr(prefect.settings, name): value for name, value in settings.items()})
    with prefect.settings.temporary_settings(updates):
        try:
            yield
        finally:
            retire_prefect_workers()


@contextmanager
def prefect_harness():
    """prefect_test_harness (a temporary server and database), with no worker left from before it or after it."""
    from prefect.testing.utilities import prefect_test_harness

    retire_prefect_workers()
    with prefect_test_harness(server_startup_timeout=120):
        yield


async def _read_task_states(flow_run_id) -> dict[str, str]:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    # Task runs are named "<task name>-<3 random chars>" unless the task names them itself.
    return {re.sub(r"-[0-9a-z]{3}$", "", r.name): r.state.type.value for r in runs}


def task_states(flow_run_id, until: Callable[[dict[str, str]], bool], timeout: float = 120.0) -> dict[str, str]:
    """The flow run's task runs as {task name: state type}, read again until `until(states)` holds or
    `timeout` passes (then the last read). Task runs reach the server through its events pipeline,
    after the flow call has returned: a read right after it may see none of them."""
    deadline = time.monotonic() + timeout
    while True:
        states = asyncio.run(_read_task_states(flow_run_id))
        if until(states) or time.monotonic() > deadline:
            return states
        time.sleep(1)
