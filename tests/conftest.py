"""Shared fixtures: a throwaway PostgreSQL database per test run, the real broker
(a queue of this run's own), real ffmpeg on generated clips, and real worker
processes for the end-to-end tests.

Every run gets its own database and queue name, so several runs (or a developer
and CI) can share one PostgreSQL and one Redis without seeing each other.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.engine import make_url

from ffworker import db as ffdb
from ffworker.config import Settings
from tests.helpers import environment_of

ROOT = Path(__file__).resolve().parent.parent
RUN_ID = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"
BASE_URL = os.environ.get("FFWORKER_DATABASE_URL", Settings.database_url)


def _admin_engine():
    return create_engine(make_url(BASE_URL).set(database="postgres"), isolation_level="AUTOCOMMIT")


_SUITE_ORDER = {"unit": 0, "integration": 1, "e2e": 2}


def pytest_collection_modifyitems(items):
    """Run unit, then integration, then end-to-end tests: fast failures first, and
    no worker process of an end-to-end module alive while a test expects none."""
    def rank(item):
        parts = Path(str(item.fspath)).relative_to(ROOT / "tests").parts
        return _SUITE_ORDER.get(parts[0], 1) if len(parts) > 1 else 1

    items.sort(key=rank)  # stable: the order inside each suite is kept


@pytest.fixture(scope="session")
def settings(tmp_path_factory) -> Settings:
    """Settings of this test run, also exported to the environment for child processes."""
    database = f"ffworker_test_{RUN_ID}"
    admin = _admin_engine()
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{database}"'))
    url = make_url(BASE_URL).set(database=database).render_as_string(hide_password=False)
    values = Settings.from_env().with_overrides(
        database_url=url,
        media_root=tmp_path_factory.mktemp("media"),
        task_queue=f"ffworker-test-{RUN_ID}",
        progress_interval_s=0.25,
    )
    from alembic import command

    from ffworker.cli import alembic_config

    command.upgrade(alembic_config(url), "head")
    os.environ.update(environment_of(values))
    yield values
    ffdb.dispose_all()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def app(settings):
    from ffworker.app import create_app

    app = create_app({"TESTING": True, "FFWORKER_SETTINGS": settings})
    yield app
    _purge_queue(app)
    # Stop listening before the session's database is dropped under the listener.
    app.extensions["ffworker_events"].hub.close()


@pytest.fixture
def client(app, clean_ledger):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


@pytest.fixture
def engine(app):
    return app.extensions["ffworker"].engine


@pytest.fixture
def ledger(app):
    return app.extensions["ffworker"].ledger


@pytest.fixture
def clean_ledger(engine):
    # A module's worker process may still be finishing an earlier test's job (a claim locks the
    # usage rows, a completion stores probes) while this TRUNCATE takes its exclusive locks table
    # by table: PostgreSQL can only break such a cycle by cancelling one side. When it cancels
    # ours, the worker's statement has gone through; empty the tables again.
    for attempt in range(1, 6):
        try:
            _truncate_ledger(engine)
            break
        except DBAPIError as exc:
            if attempt == 5 or not isinstance(exc.orig, psycopg.errors.DeadlockDetected):
                raise
            time.sleep(0.1 * attempt)
    yield


def _truncate_ledger(engine) -> None:
    with engine.begin() as conn:
        # probe_cache first: a worker of an earlier test may still be storing a probe, which
        # locks probe_cache and then (its foreign key) tenants; taking them in the other order
        # deadlocks with it.
        conn.execute(text("TRUNCATE probe_cache, job_events, jobs, api_keys, tenants, maintenance_state CASCADE"))
        # TRUNCATE fires no row trigger: the fleet's running count goes back to zero by hand.
        conn.execute(text("UPDATE fleet_usage SET running_jobs = 0"))



@pytest.fixture
def receiver():
    """A webhook receiver on loopback (tests.receiver), closed after the test."""
    from tests.receiver import Receiver

    server = Receiver()
    yield server
    server.close()


@pytest.fixture
def private_ok(app, monkeypatch):
    """FFWORKER_ALLOW_PRIVATE_URLS=1 for this app (the receiver listens on loopback)."""
    current = app.extensions["ffworker"]
    monkeypatch.setattr(current, "settings", current.settings.with_overrides(allow_private_urls=True))

@pytest.fixture(scope="session")
def s3_server():
    """One real S3 server (SeaweedFS, tests/s3server.py) for the run, started on first use.
    boto3's AWS_* variables point at it, in this process and the processes tests start."""
    from tests.s3server import SeaweedS3

    server = SeaweedS3().start()
    saved = {name: os.environ.get(name) for name in server.environment()}
    os.environ.update(server.environment())
    yield server
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    server.close()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A new, empty bucket of this test's own."""
    return s3_server.new_bucket()


@pytest.fixture
def s3_settings(settings, s3_bucket) -> Settings:
    """The run's settings with the media store in this test's bucket, under the prefix "media"."""
    return settings.with_overrides(storage_url=f"s3://{s3_bucket}/media")


def _purge_queue(app) -> None:
    celery = app.extensions["celery"]
    try:
        with celery.connection_for_write() as conn:
            conn.default_channel.queue_purge(app.extensions["ffworker"].settings.task_queue)
    except Exception:
        pass


@pytest.fixture
def purge_queue(app):
    _purge_queue(app)
    yield
    _purge_queue(app)


@dataclass
class TenantHandle:
    id: object
    name: str
    key: str
    media: Path

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.key}"}


@pytest.fixture
def make_tenant(engine, settings, clean_ledger):
    from ffworker.tenants import create_tenant

    def make(name: str) -> TenantHandle:
        # Tenants are re-created per test; their media directories must be too,
        # or one test's leftovers (temp files, outputs) would show up in the next.
        media = Path(settings.media_root) / name
        shutil.rmtree(media, ignore_errors=True)
        tenant, key = create_tenant(engine, name, settings.media_root)
        return TenantHandle(tenant.id, name, key, media)

    return make


@pytest.fixture
def tenant(make_tenant) -> TenantHandle:
    return make_tenant("acme")


@pytest.fixture
def other_tenant(make_tenant) -> TenantHandle:
    return make_tenant("globex")


# -- media ------------------------------------------------------------------


@pytest.fixture(scope="session")
def clip_cache(tmp_path_factory) -> Path:
    if shutil.which("ffmpeg") is None:
        pytest.fail("ffmpeg is not installed; run `make test`, which installs it")
    return tmp_path_factory.mktemp("clips")


def generate_clip(path: Path, *, seconds: float = 1.0, size: str = "320x240", rate: int = 25,
                  audio: bool = True, codec: str = "libx264") -> Path:
    argv = ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}:duration={seconds}"]
    if audio:
        argv += ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={seconds}", "-c:a", "aac"]
    argv += ["-c:v", codec, "-pix_fmt", "yuv420p"]
    if codec == "libx264":
        argv += ["-preset", "ultrafast"]
    elif codec == "libvpx-vp9":
        argv += ["-deadline", "realtime"]
    argv += ["-shortest", str(path)]
    subprocess.run(argv, check=True)
    return path


@pytest.fixture
def make_clip(clip_cache):
    """make_clip(dest, **params): a generated clip at dest (cached per parameter set)."""

    def make(dest: Path, **params) -> Path:
        key = "_".join(f"{k}-{v}" for k, v in sorted(params.items())) or "default"
        cached = clip_cache / f"{key}.mp4"
        if not cached.exists():
            generate_clip(cached, **params)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cached, dest)
        return dest

    return make


# -- worker processes -------------------------------------------------------


def _child_env(env: dict[str, str] | None) -> dict[str, str] | None:
    """The environment of a child process: ours (with the FFWORKER_* settings) plus ``env``."""
    return None if env is None else {**os.environ, **env}


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


class WorkerProcess:
    """A real `celery worker` child process, in a process group of its own.

    ``queues`` defaults to the job queue only; ``env`` overrides variables of
    this test run's environment (e.g. FFWORKER_* thresholds) for this worker.
    """

    def __init__(self, settings: Settings, log_path: Path, concurrency: int = 2, name: str = "w1",
                 queues: list[str] | None = None, env: dict[str, str] | None = None, wait: bool = True) -> None:
        self.log_path = log_path
        self.log = open(log_path, "ab")
        argv = [
            sys.executable, "-m", "celery", "-A", "ffworker.celery_app", "worker", "--pool", "prefork",
            "--concurrency", str(concurrency), "-O", "fair", "--prefetch-multiplier", "1",
            "-Q", ",".join(queues or [settings.task_queue]), "--hostname", f"{name}-{RUN_ID}@%h",
            "--loglevel", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env=_child_env(env))
        if wait:
            self.wait_ready()

    @property
    def pgid(self) -> int:
        """The process group: the worker and its pool processes (ffmpeg runs in groups of its own)."""
        return self.proc.pid

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if b" ready." in self.log_path.read_bytes():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.1)
        raise RuntimeError(f"worker not ready: {self.log_path.read_text()[-2000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Kill the worker's whole process group at once (as a crashed host would)."""
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()

    def terminate_group(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the whole process group, then SIGKILL whatever is left of it."""
        _terminate_group(self.proc, timeout_s)
        self.log.close()


class BeatProcess:
    """A real `celery beat` child process, in a process group of its own, with its own schedule file."""

    def __init__(self, schedule_path: Path, log_path: Path, env: dict[str, str] | None = None,
                 wait: bool = True) -> None:
        self.log_path = log_path
        self.log = open(log_path, "ab")
        argv = [sys.executable, "-m", "celery", "-A", "ffworker.celery_app", "beat",
                "--schedule", str(schedule_path), "--loglevel", "INFO"]
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env=_child_env(env))
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while b"beat: Starting" not in self.log_path.read_bytes():
            if self.proc.poll() is not None:
                raise RuntimeError(f"beat exited: {self.log_path.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"beat not started: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.1)

    def terminate_group(self, timeout_s: float = 10.0) -> None:
        _terminate_group(self.proc, timeout_s)
        self.log.close()


def _terminate_group(proc: subprocess.Popen, timeout_s: float) -> None:
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pass
    # Pool processes the leader left behind, or a leader that ignored SIGTERM.
    _signal_group(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def worker(settings, app, tmp_path_factory):
    """One worker process shared by the tests of a module, stopped when the module ends
    so that no later test finds a worker consuming messages it expects to stay queued."""
    _purge_queue(app)
    process = WorkerProcess(settings, tmp_path_factory.mktemp("logs") / "worker.log")
    yield process
    process.stop()
