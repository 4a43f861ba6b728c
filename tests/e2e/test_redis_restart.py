"""Redis restarted mid-run: a broker of the test's own (redis-server on a free port, no
persistence) goes away during encodes and comes back empty. The queued messages are gone;
the re-dispatcher publishes them again, and the worker and beat reconnect by themselves.
Every job completes exactly once.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import redis
from sqlalchemy import text

from ffworker.celery_wiring import maintenance_queue
from tests.conftest import BeatProcess, WorkerProcess
from tests.e2e.test_worker import leftovers
from tests.helpers import make_celery_current, wait_until
from tests.pgserver import free_port

pytestmark = pytest.mark.e2e

JOBS = 10
CLIP_S = 2.0


class RedisServer:
    """redis-server on a free port, no RDB or AOF: a restart loses every message, as a crash would."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.dir = directory
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed; run scripts/bootstrap.sh")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        wait_until(lambda: self._pings(client) or self.proc.poll() is not None, 10, interval_s=0.02)
        assert self.proc.poll() is None, (self.dir / "redis.log").read_text()[-2000:]

    @staticmethod
    def _pings(client) -> bool:
        try:
            return client.ping()
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


@pytest.fixture
def own_redis(tmp_path):
    server = RedisServer(tmp_path)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def broker_app(app, own_redis, settings):
    """An API app publishing to the test's own Redis (the session's app keeps the shared one)."""
    from ffworker.app import create_app

    own = create_app({"TESTING": True, "FFWORKER_SETTINGS": settings.with_overrides(broker_url=own_redis.url)})
    try:
        yield own
    finally:
        own.extensions["ffworker_events"].hub.close()
        make_celery_current(app)


@pytest.fixture
def fleet():
    processes: list = []
    try:
        yield processes
    finally:
        for proc in processes:
            try:
                proc.terminate_group()
            except Exception as exc:  # keep stopping the others
                print(f"could not stop pid {proc.proc.pid}: {exc!r}")


def test_every_job_completes_once_through_a_redis_restart(
        broker_app, own_redis, settings, engine, tenant, make_clip, fleet, tmp_path):
    make_clip(tenant.media / "in.mp4", seconds=CLIP_S, size="320x240")
    env = {
        "FFWORKER_BROKER_URL": own_redis.url,
        "FFWORKER_STALE_AFTER_S": "10",
        "FFWORKER_REAPER_GRACE_S": "30",
        "FFWORKER_MAINTENANCE_INTERVAL_S": "1",
        "FFWORKER_REDISPATCH_AFTER_S": "2",
    }
    with engine.begin() as conn:  # the reaper is live, not armed, from the start
        conn.execute(text("INSERT INTO maintenance_state (name, last_run_at) VALUES ('reaper', now()) "
                          "ON CONFLICT (name) DO UPDATE SET last_run_at = now(), armed_at = NULL"))
    fleet.append(BeatProcess(tmp_path / "beat-schedule", tmp_path / "beat.log", env=env, wait=False))
    fleet.append(WorkerProcess(settings, tmp_path / "worker.log", concurrency=2, name="redis-restart",
                               queues=[settings.task_queue, maintenance_queue(settings)], env=env, wait=False))
    for proc in fleet:
        proc.wait_ready()

    client = broker_app.test_client()
    job_ids = []
    for n in range(JOBS):
        response = client.post("/v1/jobs", headers=tenant.headers, json={
            "kind": "transcode", "input": "in.mp4", "output": f"out/{n}.mp4", "preset": "h264-360p"})
        assert response.status_code == 202, response.json
        job_ids.append(response.json["id"])

    def counts():
        with engine.connect() as conn:
            return dict(conn.execute(text("SELECT status, count(*) FROM jobs GROUP BY status")).all())

    # Restart once encodes are under way and messages are still waiting in the queue.
    wait_until(lambda: counts().get("completed", 0) >= 1 and counts().get("running", 0) >= 1, 60, interval_s=0.05)
    queued_messages = redis.Redis(port=own_redis.port).llen(settings.task_queue)
    own_redis.stop()
    # Down until the worker has noticed, so that it really reconnects to an empty broker.
    worker_log = fleet[1].log_path
    wait_until(lambda: b"Connection to broker lost" in worker_log.read_bytes(), 30, interval_s=0.05)
    own_redis.start()
    assert redis.Redis(port=own_redis.port).llen(settings.task_queue) == 0  # the messages are gone

    def all_terminal():
        return not (counts().keys() & {"queued", "running"})

    wait_until(all_terminal, 90, interval_s=0.2)
    with engine.connect() as conn:
        rows = dict(conn.execute(text("SELECT id::text, status FROM jobs")).all())
        events = conn.execute(text("SELECT job_id::text, from_status, to_status FROM job_events")).all()
    completions = Counter(e.job_id for e in events if (e.from_status, e.to_status) == ("running", "completed"))
    assert queued_messages > 0, "the restart lost no message: nothing was proven"
    assert {job_id: rows[job_id] for job_id in job_ids} == {job_id: "completed" for job_id in job_ids}
    assert {job_id: completions[job_id] for job_id in job_ids} == {job_id: 1 for job_id in job_ids}
    for n in range(JOBS):
        assert (tenant.media / f"out/{n}.mp4").stat().st_size > 0
    assert leftovers(tenant.media) == []
