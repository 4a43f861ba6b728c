"""What the bench/ scripts share: a tenant with generated media, a real Celery worker
on a queue of the script's own, and small statistics helpers.

Each script imports this module after putting the project root on sys.path; the
queue name is set in the environment before the app (or a worker) reads it, so a
running fleet never consumes a benchmark's messages.
"""
from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUEUE = f"bench-{os.getpid()}"
os.environ["FFWORKER_TASK_QUEUE"] = QUEUE
TERMINAL = ("completed", "failed", "cancelled")


@contextmanager
def own_database():
    """A throwaway database at head for this script (its statistics are its own), dropped at the end.

    Sets FFWORKER_DATABASE_URL, so the app and the workers started afterwards use it.
    """
    from alembic import command
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    from ffworker.cli import alembic_config
    from ffworker.config import Settings

    base = make_url(os.environ.get("FFWORKER_DATABASE_URL", Settings.database_url))
    name = f"bench_{os.getpid()}"
    admin = create_engine(base.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = base.set(database=name).render_as_string(hide_password=False)
    previous = os.environ.get("FFWORKER_DATABASE_URL")
    os.environ["FFWORKER_DATABASE_URL"] = url
    try:
        command.upgrade(alembic_config(url), "head")
        yield url
    finally:
        from ffworker import db

        db.dispose_all()
        if previous is None:
            os.environ.pop("FFWORKER_DATABASE_URL", None)
        else:
            os.environ["FFWORKER_DATABASE_URL"] = previous
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


class Bench:
    """An in-process API app, a throwaway tenant and its media directory."""

    def __init__(self) -> None:
        from ffworker.app import create_app
        from ffworker.tenants import create_tenant
        from ffworker.paths import tenant_root

        self.app = create_app()
        self.services = self.app.extensions["ffworker"]
        self.ledger = self.services.ledger
        self.engine = self.services.engine
        self.tenant_name = f"bench-{uuid.uuid4().hex[:8]}"
        _, key = create_tenant(self.engine, self.tenant_name, self.services.settings.media_root)
        self.media = tenant_root(self.services.settings, self.tenant_name)
        self.client = self.app.test_client()
        self.headers = {"Authorization": f"Bearer {key}"}

    def submit(self, body: dict) -> str:
        response = self.client.post("/v1/jobs", json=body, headers=self.headers)
        if response.status_code != 202:
            raise SystemExit(f"submit refused ({response.status_code}): {response.get_data(as_text=True)}")
        return response.json["id"]

    def wait_all(self, job_ids, timeout_s: float = 600, poll_s: float = 0.05) -> list[dict]:
        """Every job's row once all are terminal; exits if one did not complete.

        Polls gently: on a 2-core machine a tight polling loop takes CPU from the very
        encodes being timed (the figures come from the ledger's timestamps anyway).
        """
        deadline = time.monotonic() + timeout_s
        rows = {}
        pending = list(job_ids)
        while pending:
            if time.monotonic() > deadline:
                raise SystemExit(f"{len(pending)} job(s) did not finish within {timeout_s} s")
            row = self.ledger.get(pending[0])
            if row["status"] in TERMINAL:
                if row["status"] != "completed":
                    raise SystemExit(f"job {row['id']} ended {row['status']}: {row['error_message']}")
                rows[pending.pop(0)] = row
            else:
                time.sleep(poll_s)
        return [rows[job_id] for job_id in job_ids]

    def drop(self) -> None:
        """Remove the tenant's rows (jobs and events cascade) and its media."""
        import shutil

        with self.engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM tenants WHERE name = %(n)s", {"n": self.tenant_name})
        shutil.rmtree(self.media, ignore_errors=True)
        purge_queue(self.app)


def purge_queue(app) -> None:
    celery = app.extensions["celery"]
    with celery.connection_for_write() as conn:
        conn.default_channel.queue_purge(QUEUE)


@contextmanager
def worker(concurrency: int, env: dict[str, str] | None = None, log_path: Path | None = None,
           loglevel: str = "WARNING"):
    """A real `celery worker` (the Procfile's options) on this script's queue, until the block ends.

    Its log goes to ``log_path`` (else var/bench-worker-<pid>.log when var/ exists)."""
    if log_path is None and (ROOT / "var").is_dir():
        log_path = ROOT / "var" / f"bench-worker-{os.getpid()}.log"
    log = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "ffworker.celery_app", "worker", "-Q", QUEUE,
         "-c", str(concurrency), "--prefetch-multiplier", "1", "-O", "fair", "--loglevel", loglevel,
         "--without-gossip", "--without-mingle", "--without-heartbeat"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    try:
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if log is not subprocess.DEVNULL:
            log.close()


def generate_clip(path: Path, seconds: float, size: str = "1280x720", rate: int = 30, seed: int = 0) -> Path:
    """An H.264 + AAC clip from ffmpeg's test sources (``seed`` varies the picture)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
         "-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}:duration={seconds},hue=h={seed * 36}",
         "-f", "lavfi", "-i", f"sine=frequency={440 + 20 * seed}:duration={seconds}",
         "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(path)],
        check=True,
    )
    return path


def process_cpu_s(pids) -> float:
    """User + system CPU seconds the processes used themselves (not their waited-for children)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def processes_named(name: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as comm:
                    if comm.read().strip() == name:
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def group_members(pgid: int) -> list[int]:
    """The processes of a process group (a worker and its pool), ffmpeg children aside."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid and open(f"/proc/{entry}/comm").read().strip() not in (
                        "ffmpeg", "ffprobe"):
                    members.append(int(entry))
            except OSError:
                continue
    return members


def percentile(values, q: float) -> float:
    """The q-th percentile (0–100), linear between closest ranks."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[max(0, min(98, round(q) - 1))]


def ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f} ms"
