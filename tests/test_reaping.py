"""The reaper errs on the side of keeping: the real `run_is_active` against a real Prefect server
(prefect_test_harness), reached directly or through a proxy that injects HTTP faults (timeouts, 5xx,
a 404 that is not Prefect's, a server without our installation id), and the reap flow's decisions
across passes against the Vast.ai emulator.

Only a label carrying this server's installation id can be judged GONE, and only when the server says
so (flow run not found, a final state, heartbeats stopped); a machine is destroyed for its run on
the second GONE verdict in a row."""
from __future__ import annotations

import contextvars
import datetime as dt
import http.client
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

from infra.backends.vast.credentials import VastCredentials
from infra.reaper import ACTIVE, FOREIGN, GONE, LIVE, UNKNOWN
from prefect_api import prefect_api
from tasks import labels

HANG_S = 3.0  # > the 1 s request timeout set below
BEAT_S = 5.0  # the "running-beating" run's pace: well inside the reaper's silence rule (MISSED_BEATS x 30 s)


class FaultProxy:
    """HTTP proxy in front of the Prefect server. `fault` (None, "503", "500", "hang", "html404",
    "novar") applies to requests whose path contains `only` (every request when None)."""

    def __init__(self, upstream: str):
        u = urlsplit(upstream)
        self.host, self.port_up = u.hostname, u.port
        self.fault, self.only, self.hits = None, None, 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _reply(self, status: int, body: bytes, ctype: str = "application/json", headers=()) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _any(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fault = proxy.fault if proxy.only is None or proxy.only in self.path else None
                if fault:
                    proxy.hits += 1
                if fault == "hang":
                    time.sleep(HANG_S)
                    self.close_connection = True
                    return
                if fault in ("500", "503"):
                    return self._reply(int(fault), b'{"detail":"Service Unavailable"}')
                if fault == "html404":  # a load balancer's 404, not the Prefect server's
                    return self._reply(404, b"<html><body>404 Not Found</body></html>", "text/html")
                if fault == "novar" and "/variables/" in self.path:  # a server that never made our id
                    return self._reply(404, b'{"detail":"Variable not found"}')
                conn = http.client.HTTPConnection(proxy.host, proxy.port_up, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                r = conn.getresponse()
                data = r.read()
                conn.close()
                self._reply(r.status, data, r.getheader("Content-Type") or "application/json",
                            [(k, v) for k, v in r.getheaders() if k.lower() == "content-encoding"])

            do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def set(self, fault=None, only=None):
        self.fault, self.only, self.hits = fault, only, 0

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def server(prefect_server):
    """A real Prefect server; this installation's id created; a proxy in front of it. Yields a
    namespace: .install (our id), .proxy, .runs (name -> flow run id). "running-beating" sends a
    heartbeat every BEAT_S seconds for as long as the module runs, as a live flow run does."""
    from prefect import flow, get_client
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL
    from prefect.states import Completed, Crashed, Pending, Running

    @flow(name="qat-fake")
    def fake():
        pass

    labels._cache.clear()
    install = labels.installation_id(create=True)
    with get_client(sync_client=True) as c:
        runs = {name: c.create_flow_run(fake, state=state).id for name, state in
                (("running-beating", Running()), ("running-silent", Running()), ("running-stale", Running()),
                 ("pending", Pending()), ("completed", Completed()), ("crashed", Crashed()))}
    now = dt.datetime.now(dt.timezone.utc)
    emit_event("prefect.flow-run.heartbeat", resource={"prefect.resource.id": f"prefect.flow-run.{runs['running-stale']}"},
               occurred=now - dt.timedelta(seconds=600))
    EventsWorker.drain_all()
    stop = threading.Event()

    def beat():
        while True:
            emit_event("prefect.flow-run.heartbeat",
                       resource={"prefect.resource.id": f"prefect.flow-run.{runs['running-beating']}"})
            if stop.wait(BEAT_S):
                return
    # the thread sends through this harness's server: it runs in a copy of this context's settings
    beating = threading.Thread(target=contextvars.copy_context().run, args=(beat,), daemon=True)
    beating.start()
    proxy = FaultProxy(PREFECT_API_URL.value())
    ns = type("Server", (), {"install": install, "proxy": proxy, "runs": runs})
    # the server stores events asynchronously: wait until both heartbeats are readable
    from tasks.reaping import _heartbeats

    def stored():
        with get_client(sync_client=True) as c:
            return all(_heartbeats(c, str(runs[n]), now - dt.timedelta(days=1)) for n in ("running-beating", "running-stale"))
    deadline = time.monotonic() + 60
    while not stored():
        assert time.monotonic() < deadline, "heartbeat events never reached the server"
        time.sleep(0.5)
    try:
        yield ns
        from tasks.reaping import run_is_active

        labels._cache.clear()  # after the module's tests, minutes later: still beating, still live
        assert run_is_active(labels.make_label(install, runs["running-beating"])) == LIVE
    finally:
        stop.set()
        beating.join()
        proxy.close()
        labels._cache.clear()


def faulty_client(fault):
    """Client settings for a check: with a fault injected, no retries and a 1 s request timeout (the
    fault must reach run_is_active, quickly); without, the client's retries (the harness's SQLite
    server answers "database is locked" now and then, which the reaper would rightly not trust)."""
    from prefect.settings import PREFECT_API_REQUEST_TIMEOUT, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    return temporary_settings({PREFECT_API_REQUEST_TIMEOUT: 1, PREFECT_CLIENT_MAX_RETRIES: 0} if fault else
                              {PREFECT_API_REQUEST_TIMEOUT: 30, PREFECT_CLIENT_MAX_RETRIES: 3})


@pytest.fixture
def via_proxy(server):
    """Route the Prefect client through the fault proxy."""
    labels._cache.clear()
    server.proxy.set(None)
    with prefect_api(server.proxy.url):
        yield server.proxy
    server.proxy.set(None)
    labels._cache.clear()


def ours(server, run_id) -> str:
    return labels.make_label(server.install, run_id)


def other_install(server) -> str:
    return next(x for x in ("0badc0de", "feedf00d") if x != server.install)


# ---------------------------------------------------------------- labels

def test_label_carries_the_installation_id_and_fits_vast(server):
    run_id = uuid.uuid4()
    label = labels.run_label(run_id)
    assert label == f"qat-{server.install}-{run_id}" and len(label) <= 60
    assert labels.parse_label(label) == (server.install, run_id)
    labels._cache.clear()
    assert labels.installation_id(create=True) == server.install  # created once, read ever after
    for other in (f"qat-{run_id}", "qat-local-1700000000", f"qat-{server.install}-not-a-uuid", "mine",
                  f"qat-{server.install}-{run_id}-x", f"QAT-{server.install}-{run_id}"):
        assert labels.parse_label(other) is None, other
    assert labels.run_label(None).startswith("qat-local-")


# ---------------------------------------------------------------- the real run_is_active

@pytest.mark.parametrize("name,verdict", [("running-beating", LIVE), ("running-silent", ACTIVE),
                                          ("pending", ACTIVE), ("running-stale", GONE),
                                          ("completed", GONE), ("crashed", GONE)])
def test_runs_of_this_server(server, name, verdict):
    from tasks.reaping import run_is_active

    assert run_is_active(ours(server, server.runs[name])) == verdict


def test_unknown_run_of_this_installation_is_gone(server):
    from tasks.reaping import run_is_active

    assert run_is_active(ours(server, uuid.uuid4())) == GONE


def test_foreign_and_unprovable_labels_are_unknown(server):
    """Another installation's label, even for a run this server does not know (a 404) or a dead one:
    FOREIGN (never judged, never destroyed by age); labels without a UUID; labels of the old
    `qat-<uuid>` form: never judged, age decides."""
    from tasks.reaping import run_is_active

    unknown = uuid.uuid4()
    for label in (labels.make_label(other_install(server), unknown),
                  labels.make_label(other_install(server), server.runs["completed"])):
        assert run_is_active(label) == FOREIGN, label
    for label in (f"qat-{unknown}", f"qat-{server.runs['completed']}", "qat-manual-box", "qat-local-1700000000",
                  f"qat-{server.install}-{str(unknown)[:-1]}", "qat-", ""):
        assert run_is_active(label) == UNKNOWN, label


@pytest.mark.parametrize("fault", ["503", "500", "hang", "html404"])
@pytest.mark.parametrize("only", ["/flow_runs/", None])
def test_api_errors_are_unknown(server, via_proxy, fault, only):
    """Timeouts, 5xx and a 404 that is not the server's 'Flow run not found', on the flow run read
    or on every call: the dead run and the live one alike are kept."""
    from tasks.reaping import run_is_active

    assert run_is_active(ours(server, uuid.uuid4())) == GONE  # the proxy itself is transparent
    labels._cache.clear()
    via_proxy.set(fault, only)
    with faulty_client(fault):
        for label in (ours(server, uuid.uuid4()), ours(server, server.runs["completed"]),
                      ours(server, server.runs["running-stale"]), ours(server, server.runs["running-beating"])):
            assert run_is_active(label) == UNKNOWN, (fault, only, label)
    assert via_proxy.hits == 4, via_proxy.hits  # one faulty answer per check: given up on, never retried


def test_a_server_without_our_installation_id_judges_nothing(server, via_proxy):
    """A Prefect server that never created our id (another server sharing the Vast.ai account, or a
    PREFECT_API_URL pointed elsewhere): its 404 for our run proves nothing."""
    from tasks.reaping import run_is_active

    via_proxy.set("novar")
    with faulty_client(None):
        assert run_is_active(ours(server, uuid.uuid4())) == UNKNOWN
        assert run_is_active(ours(server, server.runs["completed"])) == UNKNOWN


def test_refused_connection_is_unknown(server):
    from devtools.emulator.sshd import free_port
    from tasks.reaping import run_is_active

    labels._cache.clear()
    with prefect_api(f"http://127.0.0.1:{free_port()}/api", PREFECT_CLIENT_MAX_RETRIES=0):
        assert run_is_active(ours(server, uuid.uuid4())) == UNKNOWN
    labels._cache.clear()


# ---------------------------------------------------------------- the reaper, pass after pass

def _create(emulator, label: str) -> int:
    from infra.backends.vast.instances import VastProvider

    p = VastProvider(api_key=emulator.api_key, server_url=emulator.url)
    offer = p._sdk.search_offers(query={"rented": {"eq": False}, "disk_space": {"gte": 10}}, no_default=True)[0]
    return p._sdk.create_instance(offer["id"], image="x", disk=10, label=label)["new_contract"]


def test_reaper_destroys_only_dead_runs_of_ours_and_only_on_the_second_check(server, via_proxy, emulator, tmp_path,
                                                                             monkeypatch):
    from infra.backends import registry as provision
    from infra.machines.machine import Lease
    from tasks.reaping import reap_labelled

    monkeypatch.setenv("VAST_API_KEY", emulator.api_key)
    monkeypatch.setenv("VAST_URL", emulator.url)
    gone_run = uuid.uuid4()
    spec = {
        "dead (unknown run, ours)": ours(server, gone_run),
        "completed (ours)": ours(server, server.runs["completed"]),
        "live": ours(server, server.runs["running-beating"]),
        "live, no heartbeats": ours(server, server.runs["running-silent"]),
        "pending": ours(server, server.runs["pending"]),
        "foreign (unknown run)": labels.make_label(other_install(server), uuid.uuid4()),
        "foreign (dead run here)": labels.make_label(other_install(server), server.runs["completed"]),
        "old form": f"qat-{gone_run}",
        "not a uuid": "qat-manual-box",
        "not ours at all": "mine",
    }
    ids = {name: _create(emulator, label) for name, label in spec.items()}
    state = tmp_path / "reaper-state.json"
    log: list[str] = []

    def alive() -> set[str]:
        live = {r["id"] for r in emulator.live_instances()}
        return {name for name, iid in ids.items() if iid in live}

    def rpass(fault=None, only=None):
        via_proxy.set(fault, only)
        labels._cache.clear()
        log.append(f"-- pass (fault {fault} on {only or 'every call'})")
        with faulty_client(fault):
            return reap_labelled(24, False, log.append, state_path=state)

    everyone = set(ids)
    doomed = {"dead (unknown run, ours)", "completed (ours)"}
    try:
        _passes(rpass, alive, everyone, doomed, spec, state, log)
    finally:
        for name in alive():
            provision.release(Lease(backend="vast", label=spec[name], instance_id=ids[name]),
                              VastCredentials(emulator.api_key, emulator.url))


def _passes(rpass, alive, everyone, doomed, spec, state, log):
    from tasks.reaping import load_suspects

    # API down (5xx, then timeouts): nothing judged, nothing remembered
    for fault in ("503", "hang"):
        assert rpass(fault) == [] and alive() == everyone and load_suspects(state) == {}
    # first "gone" verdict: remembered, kept
    assert rpass() == [] and alive() == everyone
    assert load_suspects(state) == {spec[n]: 1 for n in doomed}, "\n".join(log)
    # a check that cannot tell (a 503 on the flow run reads) breaks the streak
    assert rpass("503", "/flow_runs/") == [] and alive() == everyone and load_suspects(state) == {}
    # two "gone" verdicts in a row: destroyed on the second, and only those
    assert rpass() == [] and alive() == everyone
    rows = rpass()
    assert sorted(r["label"] for r in rows) == sorted(spec[n] for n in doomed) and all(r["destroyed"] for r in rows), log
    assert alive() == everyone - doomed and load_suspects(state) == {}
    assert rpass() == [] and alive() == everyone - doomed  # the rest stays, pass after pass
    assert any("cannot be judged; kept" in x for x in log)


def test_dry_run_remembers_nothing(server, emulator, tmp_path, monkeypatch):
    from tasks.reaping import load_suspects, reap_labelled

    monkeypatch.setenv("VAST_API_KEY", emulator.api_key)
    monkeypatch.setenv("VAST_URL", emulator.url)
    label = ours(server, uuid.uuid4())
    iid = _create(emulator, label)
    state = tmp_path / "s.json"
    for _ in range(3):
        assert reap_labelled(24, True, lambda m: None, state_path=state) == []
    assert load_suspects(state) == {} and [r["id"] for r in emulator.live_instances()] == [iid]
    assert reap_labelled(24, False, lambda m: None, state_path=state) == []
    rows = reap_labelled(24, False, lambda m: None, state_path=state)
    assert [r["instance_id"] for r in rows] == [iid] and emulator.live_instances() == []


def test_reap_flow_never_destroys_a_live_or_foreign_machine_by_age_and_ages_rows_from_first_sighting(
        server, emulator, tmp_path, monkeypatch):
    """max_age_hours 0: every machine is past the limit. A run sending heartbeats (LIVE) and another
    installation's machine (FOREIGN) are kept, with an error and a `qat.reaper.kept-past-age` event
    each; our instance being created (start_date null) is aged from the first sighting, kept in the
    state file: kept on the first pass, destroyed by age on the next."""
    from prefect import flow, get_client
    from prefect.events import emit_event
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter
    from prefect.events.worker import EventsWorker
    from prefect.states import Running
    from tasks.reaping import KEPT_PAST_AGE, _heartbeats, load_first_seen, reap_labelled

    @flow(name="qat-live")
    def live_flow():
        pass

    monkeypatch.setenv("VAST_API_KEY", emulator.api_key)
    monkeypatch.setenv("VAST_URL", emulator.url)
    with get_client(sync_client=True) as c:
        run_id = c.create_flow_run(live_flow, state=Running()).id
    since = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=5)
    emit_event("prefect.flow-run.heartbeat", resource={"prefect.resource.id": f"prefect.flow-run.{run_id}"})
    EventsWorker.drain_all()
    deadline = time.monotonic() + 60
    with get_client(sync_client=True) as c:
        while not _heartbeats(c, str(run_id), since):
            assert time.monotonic() < deadline, "the heartbeat never reached the server"
            time.sleep(0.5)
    emulator.set_faults(half_filled_s=0)
    new_label = ours(server, server.runs["pending"])
    emulator.set_faults(label_prefix=new_label, half_filled_s=600)
    spec = {"live": ours(server, run_id), "foreign": labels.make_label(other_install(server), uuid.uuid4()),
            "new": new_label}
    ids = {name: _create(emulator, label) for name, label in spec.items()}
    state = tmp_path / "state.json"
    info, errors = [], []

    def rpass():
        labels._cache.clear()
        with faulty_client(None):
            out = reap_labelled(0, False, info.append, state_path=state, log_error=errors.append)
        EventsWorker.drain_all()
        return out

    try:
        assert rpass() == [], info + errors
        assert load_first_seen(state).keys() == {str(ids["new"])}
        assert sorted(e.split(" ", 2)[1] for e in errors if "not destroyed by age" in e) == sorted(
            str(ids[n]) for n in ("live", "foreign")), errors
        time.sleep(0.05)
        rows = rpass()
        assert [(r["instance_id"], r["reason"]) for r in rows] == [(ids["new"], "older than 0 h")], info + errors
        assert load_first_seen(state) == {}
        assert sorted(r["id"] for r in emulator.live_instances()) == sorted([ids["live"], ids["foreign"]])
        deadline = time.monotonic() + 60
        with get_client(sync_client=True) as c:
            while True:
                events = c.read_events(EventFilter(event=EventNameFilter(name=[KEPT_PAST_AGE]),
                                                   occurred=EventOccurredFilter(since=since)), limit=50).events
                if len({e.resource.id for e in events}) >= 2 or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        assert {e.resource.id for e in events} == {f"vast.instance.{ids[n]}" for n in ("live", "foreign")}
    finally:
        from infra.backends import registry as provision
        from infra.machines.machine import Lease

        for r in emulator.live_instances():
            provision.release(Lease(backend="vast", label="", instance_id=r["id"]), VastCredentials(emulator.api_key, emulator.url))
