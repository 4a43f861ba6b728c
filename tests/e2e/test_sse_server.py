"""Event streams through the real web process (gunicorn, gthread, the Procfile's config)
and a real worker running ffmpeg."""
from __future__ import annotations

import os
import uuid
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from sqlalchemy import text

from ffworker.client import Client
from tests.helpers import gunicorn

pytestmark = pytest.mark.e2e

THREADS = 6  # → 2 stream slots (6 − max(4, 6 // 4)), 4 threads for everything else


@pytest.fixture(scope="module")
def web(settings, tmp_path_factory):
    """One gunicorn process with THREADS threads, as the Procfile starts it."""
    env = {"FFWORKER_SSE_KEEPALIVE_S": "0.5", "FFWORKER_WEB_THREADS": str(THREADS)}
    with gunicorn(tmp_path_factory.mktemp("web") / "gunicorn.log", env) as (url, proc):
        yield url, proc


def open_stream(url, tenant, job_id):
    response = requests.get(f"{url}/v1/jobs/{job_id}/events", headers=tenant.headers, stream=True, timeout=(5, 10))
    return response


def open_when_free(url, tenant, job_id, timeout_s: float = 5.0):
    """A stream, once a slot is free (a closed stream frees its slot at its next keep-alive)."""
    deadline = time.monotonic() + timeout_s
    while (stream := open_stream(url, tenant, job_id)).status_code == 503:
        stream.close()
        assert time.monotonic() < deadline, "no stream slot was freed"
        time.sleep(0.2)
    return stream


def listeners(engine) -> list[str]:
    """application_name of the listening connections of the gunicorn processes (not of this one)."""
    with engine.connect() as conn:
        return conn.execute(text(
            "SELECT application_name FROM pg_stat_activity WHERE application_name LIKE 'ffworker-events %' "
            "AND application_name NOT LIKE :ours AND datname = current_database()"),
            {"ours": f"%:{os.getpid()}"}).scalars().all()


def test_a_real_transcode_streams_increasing_progress_and_ends_completed(web, worker, tenant, make_clip):
    web, _ = web
    # x264's look-ahead holds ffmpeg's out_time back by ~2 s of frames at preset "slow", then it
    # jumps: a clip of 3 s left a loaded machine with two progress points. 6 s leaves several.
    make_clip(tenant.media / "in.mp4", seconds=6, size="640x360")
    client = Client(web, tenant.key)
    job = client.submit({"kind": "transcode", "input": "in.mp4", "output": f"out/sse-{uuid.uuid4().hex[:8]}.mp4",
                         "video": {"codec": "h264", "height": 720, "preset": "slow"}, "audio": {"codec": "aac"}})
    events = []
    resumed_at = None
    stream = client.events(job["id"])
    for event in stream:
        events.append(event)
        if resumed_at is None and event.event == "progress":
            # Drop the connection after the first progress event and resume where it was.
            stream.close()
            resumed_at = len(events)
            stream = client.events(job["id"], last_event_id=event.id)
            for later in stream:
                events.append(later)
            break

    statuses = [e.data["status"] for e in events if e.event == "status"]
    assert statuses == ["queued", "running", "completed"]
    percents = [e.data["percent"] for e in events if e.event == "progress"]
    assert len(percents) >= 3, percents
    assert percents == sorted(percents) and len(set(percents)) == len(percents)  # strictly increasing
    assert 0 < percents[0] < 100
    assert all(e.data["attempt"] == 1 and e.data["speed"] > 0 for e in events if e.event == "progress")
    ids = [e.id for e in events]
    assert len(set(ids)) == len(ids)  # the resumed stream replayed nothing
    final = events[-1].data["job"]
    assert final["status"] == "completed" and final["result"]["outputs"][0]["height"] == 720


def test_streams_beyond_the_cap_are_refused_while_ordinary_requests_are_served(web, engine, ledger, tenant):
    web, _ = web
    job, _ = ledger.create(tenant_id=tenant.id, kind="probe", spec={"input": "a.mp4"}, workspace="default",
                           priority=0, metadata={}, max_attempts=3, timeout_s=60)  # never dispatched: stays queued
    streams = [open_when_free(web, tenant, job["id"]) for _ in range(2)]
    assert [s.status_code for s in streams] == [200, 200]
    refused = requests.get(f"{web}/v1/jobs/{job['id']}/events", headers=tenant.headers, timeout=5)
    assert refused.status_code == 503 and int(refused.headers["Retry-After"]) > 0

    # With both stream slots taken, the remaining threads answer a burst of ordinary requests.
    def ordinary(i):
        started = time.monotonic()
        path = ("/health", f"/v1/jobs/{job['id']}", "/v1/jobs?limit=5", "/metrics")[i % 4]
        status = requests.get(web + path, headers=tenant.headers, timeout=10).status_code
        return status, time.monotonic() - started

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(ordinary, range(32)))
    assert {status for status, _ in results} == {200}
    assert max(elapsed for _, elapsed in results) < 3.0

    # Two streams, one listening connection in the process.
    assert len(listeners(engine)) == 1
    ledger.claim(job["id"], "w")
    for stream in streams:
        chunks = b""
        for chunk in stream.iter_content(chunk_size=None):
            chunks += chunk
            if b'"status":"running"' in chunks:
                break
        assert b'"status":"running"' in chunks

    streams.pop().close()  # the server notices at its next keep-alive write and frees the slot
    open_when_free(web, tenant, job["id"]).close()
    for stream in streams:
        stream.close()


def test_stopping_the_web_process_ends_its_streams_at_once(web, ledger, tenant):
    """Runs last in this module: it stops the server."""
    url, proc = web
    job, _ = ledger.create(tenant_id=tenant.id, kind="probe", spec={"input": "a.mp4"}, workspace="default",
                           priority=0, metadata={}, max_attempts=3, timeout_s=60)
    stream = open_when_free(url, tenant, job["id"])
    chunks = stream.iter_content(chunk_size=None)
    received = b""
    while b'"status":"queued"' not in received:
        received += next(chunks)
    stopped = time.monotonic()
    proc.terminate()  # SIGTERM: a deploy or a scale-down
    for chunk in chunks:  # the stream ends (cleanly) instead of lasting until graceful_timeout
        pass
    assert time.monotonic() - stopped < 1
    proc.wait(timeout=10)
    assert time.monotonic() - stopped < 10  # graceful_timeout is 30 s
