"""Maintenance keeps running while every job process is busy: the Procfile's Celery
workers, started exactly as its lines say, with the one job process held by a long
(real-time, CPU-light) ffmpeg run while a dead worker's job waits to be reaped."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from ffworker.dispatch import RUN_JOB
from ffworker.maintenance import reaper
from tests.conftest import ROOT, RUN_ID, _terminate_group
from tests.helpers import wait_until
from tests.integration.test_ledger import backdate, new_job

pytestmark = pytest.mark.e2e


def procfile_celery_workers() -> dict[str, str]:
    """The Procfile's lines that start a Celery worker, by process name."""
    lines = (ROOT / "Procfile").read_text().splitlines()
    entries = dict(line.split(":", 1) for line in lines if re.match(r"^[a-z]+:", line))
    return {name: command.strip() for name, command in entries.items() if re.search(r"\bcelery\b.* worker\b", command)}


class ProcfileProcess:
    """One Procfile line run by a shell, as a Procfile runner does; a process group of its own."""

    def __init__(self, name: str, command: str, log_path: Path, env: dict[str, str]) -> None:
        self.log_path = log_path
        self.log = open(log_path, "ab")
        # One pool process (the job worker's default is one per CPU), and names and chatter
        # of this test run's own; the line itself is run as written.
        extra = f" --concurrency 1 --hostname {name}-{RUN_ID}@%h --without-gossip --without-mingle --without-heartbeat"
        path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
        self.proc = subprocess.Popen(["bash", "-c", f"exec {command}{extra}"], cwd=ROOT, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, **env, "PATH": path})

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        wait_until(lambda: b" ready." in self.log_path.read_bytes() or self.proc.poll() is not None, timeout_s)
        assert self.proc.poll() is None, self.log_path.read_text()[-2000:]

    def stop(self) -> None:
        _terminate_group(self.proc, 10)
        self.log.close()


def test_a_stale_job_is_reaped_while_every_job_process_is_encoding(
        app, settings, engine, ledger, tenant, make_clip, tmp_path):
    queue = f"{settings.task_queue}-busy"
    env = {"FFWORKER_TASK_QUEUE": queue, "FFWORKER_ALLOW_RAW_COMMANDS": "1"}
    celery = app.extensions["celery"]
    make_clip(tenant.media / "busy/in.mp4", seconds=1, size="160x120")

    processes = [ProcfileProcess(name, command, tmp_path / f"{name}.log", env)
                 for name, command in procfile_celery_workers().items()]
    try:
        for process in processes:
            process.wait_ready()
        # The only job process: ffmpeg reading its input at real time, looped, ≈ 30 s.
        busy = new_job(ledger, tenant, kind="command", timeout_s=120, spec={"args": [
            "-re", "-stream_loop", "29", "-i", "busy/in.mp4", "-c", "copy", "busy/out.mp4"]})
        celery.send_task(RUN_JOB, args=[str(busy["id"])], queue=queue)
        wait_until(lambda: (ledger.get(busy["id"])["progress_at"] is not None), 20)

        # A job whose worker died: silent for ten minutes, beside a live fleet.
        dead = new_job(ledger, tenant)
        ledger.claim(dead["id"], "w-dead")
        backdate(engine, dead["id"], heartbeat_at=600)
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO maintenance_state (name, last_run_at) VALUES ('reaper', now()) "
                              "ON CONFLICT (name) DO UPDATE SET last_run_at = now(), armed_at = NULL"))

        sent = time.monotonic()
        celery.send_task(reaper.TASK, queue=f"{queue}.maintenance")  # beat's next round
        wait_until(lambda: ledger.get(dead["id"])["status"] != "running", 10)
        reaped_after_s = time.monotonic() - sent
        assert ledger.get(dead["id"])["status"] == "queued"
        assert ledger.get(busy["id"])["status"] == "running", "the job process was not busy throughout"
        assert reaped_after_s < 10
    finally:
        with engine.connect() as conn:  # end the long run now rather than in 30 s
            unfinished = conn.execute(text("SELECT id FROM jobs WHERE status IN ('queued', 'running')")).scalars().all()
        for job_id in unfinished:
            ledger.request_cancel(job_id, tenant.id)
        if unfinished:
            wait_until(lambda: all(ledger.get(job_id)["status"] == "cancelled" for job_id in unfinished), 10)
        for process in processes:
            process.stop()
        with celery.connection_for_write() as conn:
            for name in (queue, f"{queue}.maintenance"):
                try:
                    conn.default_channel.queue_purge(name)
                except Exception:
                    pass
