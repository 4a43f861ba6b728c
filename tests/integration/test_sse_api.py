"""Live job events over HTTP: the SSE stream and the long-poll, on a real server thread.

The app runs under werkzeug's threaded server (HTTP/1.1, chunked), read with
`requests` as a client would. Transitions are driven through the real ledger,
whose writes NOTIFY the stream; no worker runs here, so jobs move only when
the test moves them.
"""
from __future__ import annotations

import json
import threading
import time
import uuid

import pytest
import requests
from sqlalchemy import text
from werkzeug.serving import WSGIRequestHandler, make_server

from ffworker.listener import NotificationHub, listen_dsn
from ffworker.sse import Events
from ffworker.stream_slots import StreamLimits
from tests.helpers import wait_until

pytestmark = pytest.mark.integration

LIMITS = StreamLimits(max_streams=3, keepalive_s=0.3, max_duration_s=30, retry_after_s=3)


class Http11Handler(WSGIRequestHandler):
    protocol_version = "HTTP/1.1"  # chunked responses: each event reaches the client as it is written

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def live(app, settings):
    """The session app under a real threaded server, with a fresh hub and small limits."""
    previous = app.extensions["ffworker_events"]
    ledger = app.extensions["ffworker"].ledger
    state = Events(NotificationHub(listen_dsn(settings.database_url), ledger.job_with_events), settings, LIMITS)
    app.extensions["ffworker_events"] = state
    state.hub.subscribe(uuid.uuid4()).close()  # the hub listens from its first subscriber on
    wait_until(state.hub.connected.is_set, 10)
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=Http11Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", state
    server.shutdown()
    thread.join(5)
    state.hub.close()
    app.extensions["ffworker_events"] = previous


@pytest.fixture
def events_state(live):
    state = live[1]
    # Streams of the previous test end when their next keep-alive write fails.
    wait_until(lambda: state.slots.open == 0 and state.hub.subscriber_count == 0, 5)
    return state


@pytest.fixture
def base_url(live, events_state, clean_ledger):
    return live[0]


def new_job(ledger, tenant, **overrides):
    values = dict(tenant_id=tenant.id, kind="transcode", spec={"input": "a.mp4", "output": "b.mp4"},
                  workspace="default", priority=0, metadata={}, max_attempts=3, timeout_s=60)
    values.update(overrides)
    job, _ = ledger.create(**values)
    return job


def progress(percent: float, speed: float = 2.0) -> dict:
    return {"percent": percent, "frame": int(percent * 10), "fps": 50.0, "speed": speed,
            "out_time_s": percent / 10, "eta_s": (100 - percent) / 20}


class Stream:
    """An open SSE response, read event by event."""

    def __init__(self, base_url: str, tenant, job_id, last_event_id: str | None = None) -> None:
        headers = {**tenant.headers, "Accept": "text/event-stream"}
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        self.response = requests.get(f"{base_url}/v1/jobs/{job_id}/events", headers=headers, stream=True,
                                     timeout=(5, 10))
        self.buffer = b""
        self.comments = 0

    def next(self) -> dict | None:
        """The next event as {"id", "event", "data"}; None at the end of the stream."""
        while True:
            while b"\n\n" in self.buffer:
                block, self.buffer = self.buffer.split(b"\n\n", 1)
                event = {}
                for line in block.decode().split("\n"):
                    name, _, value = line.partition(": ")
                    if name == "":
                        self.comments += 1
                    elif name == "data":
                        event["data"] = json.loads(value)
                    else:
                        event[name] = value
                if "event" in event:
                    return event
            chunk = self.response.raw.read1(65536)
            if not chunk:
                return None
            self.buffer += chunk

    def rest(self) -> list[dict]:
        events = []
        while (event := self.next()) is not None:
            events.append(event)
        return events

    def close(self) -> None:
        self.response.close()


def summary(event: dict) -> tuple:
    data = event["data"]
    return (event["event"], data["status"] if event["event"] == "status" else data["percent"])


def test_a_stream_follows_transitions_and_progress_as_they_commit_and_ends_after_the_terminal_status(
        base_url, ledger, tenant):
    job = new_job(ledger, tenant)
    stream = Stream(base_url, tenant, job["id"])
    assert stream.response.status_code == 200
    assert stream.response.headers["Content-Type"].startswith("text/event-stream")
    assert stream.response.headers["Cache-Control"] == "no-cache, no-store"

    first = stream.next()
    assert summary(first) == ("status", "queued")
    assert first["data"]["previous_status"] is None and first["data"]["attempt"] == 0

    claim = ledger.claim(job["id"], "test-worker")
    committed = time.monotonic()
    running = stream.next()
    assert time.monotonic() - committed < 1.0  # pushed by NOTIFY, not found by a timer
    assert summary(running) == ("status", "running") and running["data"]["attempt"] == 1

    seen = []
    for percent in (12.5, 40.0, 87.5):
        ledger.heartbeat(job["id"], claim.token, progress(percent))
        event = stream.next()
        seen.append(summary(event))
        assert event["data"]["attempt"] == 1 and event["data"]["speed"] == 2.0
    assert seen == [("progress", 12.5), ("progress", 40.0), ("progress", 87.5)]

    ledger.complete(job["id"], claim.token, {"outputs": []})
    done = stream.next()
    assert summary(done) == ("status", "completed")
    assert done["data"]["job"]["status"] == "completed" and done["data"]["job"]["id"] == str(job["id"])
    assert done["data"]["job"]["progress"]["percent"] == 100.0
    shown = requests.get(f"{base_url}/v1/jobs/{job['id']}", headers=tenant.headers, timeout=5).json()
    assert done["data"]["job"] == shown  # the finished job exactly as GET shows it
    assert "worker" not in json.dumps(done["data"])  # the worker's host stays internal
    assert stream.next() is None  # the server ended the stream

    ids = [first["id"], running["id"], done["id"]]
    assert len(set(ids)) == 3


def test_reconnecting_with_last_event_id_sends_only_what_is_newer(base_url, ledger, tenant):
    job = new_job(ledger, tenant)
    claim = ledger.claim(job["id"], "test-worker")
    ledger.heartbeat(job["id"], claim.token, progress(30.0))

    history = Stream(base_url, tenant, job["id"])
    replayed = [history.next() for _ in range(3)]
    history.close()
    assert [summary(e) for e in replayed] == [("status", "queued"), ("status", "running"), ("progress", 30.0)]

    # Resume after "running": the progress written before is still news; the transitions are not.
    resumed = Stream(base_url, tenant, job["id"], last_event_id=replayed[1]["id"])
    assert summary(resumed.next()) == ("progress", 30.0)
    ledger.heartbeat(job["id"], claim.token, progress(60.0))
    latest = resumed.next()
    assert summary(latest) == ("progress", 60.0)
    resumed.close()

    # Resume after the newest event: nothing is replayed, new events follow.
    again = Stream(base_url, tenant, job["id"], last_event_id=latest["id"])
    ledger.complete(job["id"], claim.token, {"outputs": []})
    assert [summary(e) for e in again.rest()] == [("status", "completed")]

    # Resuming after the terminal event: 204, which tells EventSource clients to stop.
    response = requests.get(f"{base_url}/v1/jobs/{job['id']}/events", timeout=5,
                            headers={**tenant.headers, "Last-Event-ID": again_last_id(base_url, tenant, job["id"])})
    assert response.status_code == 204


def again_last_id(base_url, tenant, job_id) -> str:
    stream = Stream(base_url, tenant, job_id)
    events = stream.rest()
    assert summary(events[-1]) == ("status", "completed")
    return events[-1]["id"]


def test_a_stream_of_a_finished_job_replays_its_history_and_ends(base_url, ledger, tenant):
    job = new_job(ledger, tenant)
    claim = ledger.claim(job["id"], "test-worker")
    ledger.heartbeat(job["id"], claim.token, progress(50.0))
    ledger.fail(job["id"], claim.token, code="io_error", message="disk full", retryable=True)
    with ledger.engine.begin() as conn:  # let the retry be due at once
        conn.exec_driver_sql("UPDATE jobs SET run_after = now() WHERE id = %s", (str(job["id"]),))
    claim = ledger.claim(job["id"], "test-worker")
    ledger.heartbeat(job["id"], claim.token, progress(75.0))
    ledger.fail(job["id"], claim.token, code="ffmpeg_failed", message="ffmpeg exited with code 1: bad")

    events = Stream(base_url, tenant, job["id"]).rest()
    assert [summary(e) for e in events] == [
        ("status", "queued"), ("status", "running"), ("status", "queued"), ("status", "running"),
        ("progress", 75.0), ("status", "failed"),
    ]
    assert [e["data"]["attempt"] for e in events] == [0, 1, 1, 2, 2, 2]
    assert events[2]["data"]["reason"] == "io_error: disk full"
    assert events[-1]["data"]["job"]["error"] == {"code": "ffmpeg_failed", "message": "ffmpeg exited with code 1: bad"}


def test_an_open_stream_does_not_read_the_ledger_while_nothing_changes(base_url, ledger, tenant, events_state):
    job = new_job(ledger, tenant)
    reads = []
    read = events_state.hub._read
    events_state.hub._read = lambda job_id: reads.append(job_id) or read(job_id)
    try:
        stream = Stream(base_url, tenant, job["id"])
        assert summary(stream.next()) == ("status", "queued")
        before = len(reads)
        time.sleep(1.0)  # three keep-alive intervals
        assert len(reads) == before
        ledger.claim(job["id"], "test-worker")
        assert summary(stream.next()) == ("status", "running")
        assert len(reads) == before + 1
        assert stream.comments >= 2  # keep-alive comments kept flowing meanwhile
        stream.close()
    finally:
        events_state.hub._read = read


def test_a_stream_survives_the_loss_of_the_listening_connection(base_url, engine, ledger, tenant, events_state):
    job = new_job(ledger, tenant)
    stream = Stream(base_url, tenant, job["id"])
    assert summary(stream.next()) == ("status", "queued")
    with engine.begin() as conn:  # what a database restart or a network cut does to it
        killed = conn.execute(text(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = :name "
            "AND datname = current_database()"), {"name": events_state.hub.application_name}).all()
    assert killed
    claim = ledger.claim(job["id"], "test-worker")  # committed while nobody may be listening
    assert summary(stream.next()) == ("status", "running")
    wait_until(events_state.hub.connected.is_set, 10)
    ledger.heartbeat(job["id"], claim.token, progress(10.0))
    assert summary(stream.next()) == ("progress", 10.0)
    stream.close()


def test_a_client_that_goes_away_frees_its_subscription_and_slot(base_url, ledger, tenant, events_state):
    job = new_job(ledger, tenant)
    stream = Stream(base_url, tenant, job["id"])
    assert summary(stream.next()) == ("status", "queued")
    assert events_state.hub.subscriber_count == 1 and events_state.slots.open == 1
    stream.close()
    # The next keep-alive write fails: the server closes the stream.
    wait_until(lambda: events_state.hub.subscriber_count == 0 and events_state.slots.open == 0, 5)


def test_streams_beyond_the_per_process_cap_get_503_with_retry_after(base_url, ledger, tenant, events_state):
    job = new_job(ledger, tenant)
    streams = [Stream(base_url, tenant, job["id"]) for _ in range(LIMITS.max_streams)]
    for stream in streams:
        assert stream.response.status_code == 200
    refused = requests.get(f"{base_url}/v1/jobs/{job['id']}/events", headers=tenant.headers, timeout=5)
    assert refused.status_code == 503
    assert refused.headers["Retry-After"] == "3"
    assert "retry" in refused.json()["message"]
    long_poll = requests.get(f"{base_url}/v1/jobs/{job['id']}?wait=5", headers=tenant.headers, timeout=5)
    assert long_poll.status_code == 503
    # Ordinary requests are not affected.
    assert requests.get(f"{base_url}/v1/jobs/{job['id']}", headers=tenant.headers, timeout=5).status_code == 200

    streams.pop().close()
    wait_until(lambda: events_state.slots.open == LIMITS.max_streams - 1, 5)
    extra = Stream(base_url, tenant, job["id"])
    assert extra.response.status_code == 200
    for stream in [*streams, extra]:
        stream.close()


def test_events_of_another_tenants_job_are_not_found(base_url, ledger, tenant, other_tenant):
    job = new_job(ledger, tenant)
    for url in (f"{base_url}/v1/jobs/{job['id']}/events", f"{base_url}/v1/jobs/{job['id']}?wait=1",
                f"{base_url}/v1/jobs/{uuid.uuid4()}/events"):
        response = requests.get(url, headers=other_tenant.headers, timeout=5)
        assert response.status_code == 404, url
        assert response.json()["message"] == "job not found"
    unauthenticated = requests.get(f"{base_url}/v1/jobs/{job['id']}/events", timeout=5)
    assert unauthenticated.status_code == 401


# -- long-poll ------------------------------------------------------------------------


def test_long_poll_returns_as_soon_as_the_job_ends(base_url, ledger, tenant):
    job = new_job(ledger, tenant)
    claim = ledger.claim(job["id"], "test-worker")

    def finish_later():
        time.sleep(0.5)
        ledger.heartbeat(job["id"], claim.token, progress(50.0))  # wakes the poll, which keeps waiting
        time.sleep(0.3)
        ledger.complete(job["id"], claim.token, {"outputs": []})

    threading.Thread(target=finish_later).start()
    started = time.monotonic()
    response = requests.get(f"{base_url}/v1/jobs/{job['id']}", params={"wait": 10}, headers=tenant.headers,
                            timeout=15)
    elapsed = time.monotonic() - started
    assert response.status_code == 200 and response.json()["status"] == "completed"
    # Not woken for good by the progress write (0.5 s), answered at the completion (0.8 s),
    # long before the 10 s the client was ready to wait.
    assert 0.8 <= elapsed < 5.0


def test_long_poll_answers_after_the_wait_when_the_job_does_not_end(base_url, ledger, tenant):
    job = new_job(ledger, tenant)
    started = time.monotonic()
    response = requests.get(f"{base_url}/v1/jobs/{job['id']}?wait=0.6", headers=tenant.headers, timeout=5)
    assert response.status_code == 200 and response.json()["status"] == "queued"
    assert 0.55 < time.monotonic() - started < 2.0


def test_long_poll_of_a_finished_job_answers_at_once_and_the_wait_is_bounded(client, ledger, tenant):
    job = new_job(ledger, tenant)
    ledger.request_cancel(job["id"], tenant.id)
    started = time.monotonic()
    response = client.get(f"/v1/jobs/{job['id']}?wait=60", headers=tenant.headers)
    assert response.status_code == 200 and response.json["status"] == "cancelled"
    assert time.monotonic() - started < 1.0
    for bad in ("61", "-1", "soon", "nan"):
        response = client.get(f"/v1/jobs/{job['id']}?wait={bad}", headers=tenant.headers)
        assert response.status_code == 422, bad
        assert "wait" in response.json["errors"]
