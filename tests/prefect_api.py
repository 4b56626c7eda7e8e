"""Pointing this test process's Prefect client at one server, then at another, without losing events.

Prefect keeps one events worker per process for "a running server", whatever PREFECT_API_URL says
(its cache key is the client class, not the URL). A worker started while a test pointed at one server
keeps sending there after the test has moved on: a later harness's task runs never reach its server
(their states arrive as events), and the harness's drain at exit waits on it for ever. So each switch
retires the workers it started, while their server still answers.
"""
from __future__ import annotations

from contextlib import contextmanager

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
