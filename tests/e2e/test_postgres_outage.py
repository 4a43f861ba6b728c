"""PostgreSQL down mid-run: a server of the test's own is stopped for about ten seconds while
encodes run (shorter than the stale threshold) and started again.

The whole stack is real and points at that server: the web process (gunicorn, as the Procfile
runs it), a Celery worker, beat. Running encodes must finish at their first attempt, every job
completes exactly once, no finished encode runs again, and `/ready` answers 503 naming the
database during the outage and 200 afterwards without anyone restarting anything.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import requests
from sqlalchemy import create_engine, text

from ffworker import process
from ffworker.celery_wiring import maintenance_queue
from ffworker.tenants import create_tenant
from tests.conftest import BeatProcess, WorkerProcess
from tests.e2e.test_worker import leftovers
from tests.helpers import wait_until
from tests.pgserver import PgServer, free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
JOBS = 6
CLIP_S = 6.0
OUTAGE_S = 10.0
STALE_AFTER_S = 30  # the outage must stay well inside it: a silent but healthy job is not stale yet


@pytest.fixture
def pg():
    server = PgServer()
    try:
        server.start()
        server.create_database()
        yield server
    finally:
        server.close()


@pytest.fixture
def stack(pg, settings, tmp_path):
    """Web, worker and beat on the test's own server and queue; all stopped group-wide at the end."""
    queue = f"{settings.task_queue}-pgdown"
    env = {
        "FFWORKER_DATABASE_URL": pg.url,
        "FFWORKER_TASK_QUEUE": queue,
        "FFWORKER_STALE_AFTER_S": str(STALE_AFTER_S),
        "FFWORKER_REAPER_GRACE_S": "60",
        "FFWORKER_MAINTENANCE_INTERVAL_S": "1",
        "FFWORKER_REDISPATCH_AFTER_S": "3",
        "FFWORKER_WEB_THREADS": "4",
    }
    port = free_port()
    started: list = []
    web_log = open(tmp_path / "web.log", "wb")
    try:
        web = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "ffworker/gunicorn_conf.py"),
             "--bind", f"127.0.0.1:{port}", "--workers", "1", "ffworker.app:create_app()"],
            cwd=ROOT, env={**os.environ, **env}, stdout=web_log, stderr=subprocess.STDOUT, start_new_session=True)
        started.append(web)
        queues = [queue, maintenance_queue(settings.with_overrides(task_queue=queue))]
        fleet = [BeatProcess(tmp_path / "beat-schedule", tmp_path / "beat.log", env=env, wait=False),
                 WorkerProcess(settings, tmp_path / "worker.log", concurrency=2, name="pgdown", queues=queues,
                               env=env, wait=False)]
        started.extend(proc.proc for proc in fleet)
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _get(url + "/health") == 200 or web.poll() is not None, 30, interval_s=0.1)
        assert web.poll() is None, (tmp_path / "web.log").read_text()[-2000:]
        for proc in fleet:
            proc.wait_ready()
        yield url, queues
    finally:
        for proc in started:
            _stop_group(proc)
        web_log.close()
        try:
            from kombu import Connection

            with Connection(settings.broker_url) as conn:
                for name in (queue, f"{queue}.maintenance"):
                    try:
                        conn.default_channel.queue_delete(name)
                    except Exception:
                        pass
        except Exception:
            pass


def _stop_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def _get(url: str, **kwargs) -> int | None:
    try:
        return requests.get(url, timeout=5, **kwargs).status_code
    except requests.RequestException:
        return None


def test_running_encodes_survive_a_ten_second_database_outage(pg, stack, settings, make_clip):
    url, _ = stack
    engine = create_engine(pg.url, pool_pre_ping=True)
    try:
        # The reaper ran just now and is not armed: it is live through the outage, as in production.
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO maintenance_state (name, last_run_at) VALUES ('reaper', now()) "
                              "ON CONFLICT (name) DO UPDATE SET last_run_at = now(), armed_at = NULL"))
        _, key = create_tenant(engine, "pgdown", settings.media_root)
        media = Path(settings.media_root) / "pgdown"
        make_clip(media / "in.mp4", seconds=CLIP_S, size="320x240")
        headers = {"Authorization": f"Bearer {key}"}
        job_ids = []
        for n in range(JOBS):
            response = requests.post(f"{url}/v1/jobs", headers=headers, timeout=10, json={
                "kind": "transcode", "input": "in.mp4", "output": f"out/{n}.mp4", "preset": "h264-360p"})
            assert response.status_code == 202, response.text
            job_ids.append(response.json()["id"])
        assert _get(url + "/ready") == 200

        def encoding_now():
            with engine.connect() as conn:
                return conn.execute(text(
                    "SELECT array_agg(id::text) FROM jobs WHERE status = 'running' AND progress_frame > 0")).scalar()

        running_at_stop = wait_until(encoding_now, 60, interval_s=0.1)
        pg.stop()
        stopped_at = time.monotonic()
        down_answers = []
        while time.monotonic() - stopped_at < OUTAGE_S:
            response = requests.get(url + "/ready", timeout=10)
            down_answers.append((response.status_code, response.json().get("down")))
            time.sleep(0.5)
        pg.start()
        recovered = wait_until(lambda: _get(url + "/ready") == 200, 30, interval_s=0.2)
        assert recovered

        def all_terminal():
            with engine.connect() as conn:
                return not conn.execute(text(
                    "SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')")).scalar()

        wait_until(all_terminal, 90, interval_s=0.2)
        with engine.connect() as conn:
            rows = {r.id: r for r in conn.execute(text(
                "SELECT id::text AS id, status, attempts, error_code FROM jobs"))}
            events = conn.execute(text(
                "SELECT job_id::text, from_status, to_status, attempt, reason FROM job_events ORDER BY id")).all()
    finally:
        engine.dispose()

    assert down_answers and all(answer == (503, ["database"]) for answer in down_answers), down_answers
    assert {job_id: rows[job_id].status for job_id in job_ids} == {job_id: "completed" for job_id in job_ids}, \
        {job_id: (rows[job_id].status, rows[job_id].error_code) for job_id in job_ids}
    claims = Counter(e.job_id for e in events if (e.from_status, e.to_status) == ("queued", "running"))
    completions = Counter(e.job_id for e in events if (e.from_status, e.to_status) == ("running", "completed"))
    # One claim each: no encode ran twice, not even one that had finished while the ledger was away.
    assert dict(claims) == {job_id: 1 for job_id in job_ids}, \
        [tuple(e) for e in events if e.from_status == "running" and e.to_status != "completed"]
    assert dict(completions) == {job_id: 1 for job_id in job_ids}
    assert all(rows[job_id].attempts == 1 for job_id in running_at_stop)
    for n in range(JOBS):
        probe = process.ffprobe(str(media / f"out/{n}.mp4"))
        assert float(probe["format"]["duration"]) == pytest.approx(CLIP_S, abs=0.15)
    assert leftovers(media) == []
