"""The tests' switch between Prefect servers (tests/prefect_api.py): the events worker started while
pointing at one server is not the one that carries the next server's events."""
from __future__ import annotations

from prefect_api import prefect_api


def test_an_events_worker_bound_to_one_server_is_retired_when_the_test_moves_on():
    from prefect.events.worker import EventsWorker

    with prefect_api("http://127.0.0.1:9/api"):
        first = EventsWorker.instance()
    with prefect_api("http://127.0.0.1:10/api"):
        second = EventsWorker.instance()
        assert second is not first  # Prefect's cache key is the client class: without the retire, the same worker
    assert first._stopped and second._stopped
