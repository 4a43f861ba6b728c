"""Helpers shared by the tests (not fixtures)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

from ffworker.client import Client
from ffworker.config import Settings
from tests.pgserver import free_port

ROOT = Path(__file__).resolve().parent.parent


def environment_of(settings: Settings) -> dict[str, str]:
    """The variables that reproduce ``settings`` in a child process."""
    return {Settings.env_name(f.name): str(getattr(settings, f.name))
            for f in fields(settings) if getattr(settings, f.name) is not None}


def ffmpeg_processes_touching(fragment: str) -> list[int]:
    """PIDs of ffmpeg processes whose argv mentions ``fragment``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"ffmpeg") and any(fragment.encode() in arg for arg in argv):
            pids.append(int(entry.name))
    return pids


def wait_until(predicate, timeout_s: float = 30.0, interval_s: float = 0.05):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(interval_s)


def make_celery_current(app) -> None:
    """Make ``app``'s Celery the current and default one again.

    Creating a second Flask app (another queue, a broken broker) makes its Celery
    current, and shared tasks called in-process would then run on that app.
    """
    app.extensions["celery"].set_current()
    app.extensions["celery"].set_default()


def field_names(messages, prefix: str = "") -> set[str]:
    """Dotted names of every field in a marshmallow error dict: {"video": {"crf": ...}} → video, video.crf."""
    names = set()
    if isinstance(messages, dict):
        for key, value in messages.items():
            names.add(prefix + str(key))
            names |= field_names(value, f"{prefix}{key}.")
    return names


def ffprobe_output(*, video=True, audio=True, duration="12.500000", stream_duration=None) -> dict:
    """ffprobe's JSON for a 1080p h264 + aac file of 12.5 s (each part optional)."""
    streams = []
    if video:
        streams.append({"index": 0, "codec_type": "video", "codec_name": "h264", "width": 1920, "height": 1080,
                        "avg_frame_rate": "30000/1001", "pix_fmt": "yuv420p", "duration": stream_duration})
    if audio:
        streams.append({"index": len(streams), "codec_type": "audio", "codec_name": "aac", "sample_rate": "48000",
                        "channels": 2, "duration": stream_duration})
    fmt = {"format_name": "mov,mp4,m4a,3gp,3g2,mj2"}
    if duration is not None:
        fmt["duration"] = duration
    return {"streams": streams, "format": fmt}


def option(args: list[str], flag: str) -> str:
    """The value following the one occurrence of ``flag``."""
    assert args.count(flag) == 1, f"{flag} appears {args.count(flag)} times in {args}"
    return args[args.index(flag) + 1]


@contextmanager
def gunicorn(log_path: Path, env: dict[str, str]):
    """One gunicorn web process as the Procfile starts it, on a free loopback port, with ``env``
    over this run's environment; yields (url, process) once /health answers, and stops its
    whole process group afterwards."""
    port = free_port()
    environment = {**os.environ, **env}
    environment.pop("FFWORKER_SSE_MAX_STREAMS", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "ffworker/gunicorn_conf.py"),
             "--bind", f"127.0.0.1:{port}", "--workers", "1", "ffworker.app:create_app()"],
            cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not Client(url).healthy():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"gunicorn did not start: {log_path.read_text()[-2000:]}")
        time.sleep(0.1)
    try:
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def stop_fleet(processes: list, app, settings) -> None:
    """Stop the worker and beat processes a test started (each group-wide, SIGTERM then SIGKILL;
    a failure to stop one is printed and the others are still stopped), then drop the
    maintenance messages beat left queued for the next test's workers."""
    from ffworker.celery_wiring import maintenance_queue

    for proc in processes:
        try:
            proc.terminate_group()
        except Exception as exc:  # keep stopping the others
            print(f"could not stop pid {proc.proc.pid}: {exc!r}")
    try:
        with app.extensions["celery"].connection_for_write() as conn:
            conn.default_channel.queue_purge(maintenance_queue(settings))
    except Exception:
        pass


@contextmanager
def scratch_database(settings, tag: str = "s"):
    """An empty database of its own beside the run's (url, engine), dropped afterwards: for
    migrating from an old revision."""
    import uuid

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    base = make_url(settings.database_url)
    name = f"{base.database}_{tag}{uuid.uuid4().hex[:6]}"
    admin = create_engine(base.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = base.set(database=name).render_as_string(hide_password=False)
    engine = create_engine(url)
    try:
        yield url, engine
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
