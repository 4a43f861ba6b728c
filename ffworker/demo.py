"""``manage.py demo``: one transcode through the whole stack, starting whatever half is missing.

A generated 720p clip is transcoded to 360p through the REST API, a web
process and a worker; the demo starts each of the two only when none is
running (so it also works beside ``honcho start``) and stops what it started.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
import uuid
from functools import partial
from pathlib import Path

import click
from rich.table import Table

from ffworker import process
from ffworker.terminal import api_call, console, err_console, follow
from ffworker.client import Client
from ffworker.tenants import TenantError, create_tenant, issue_key

# The checkout the demo runs from: gunicorn's config file and var/log live here.
ROOT = Path(__file__).resolve().parent.parent


def run(app, port: int, seconds: int) -> None:
    """The demo job from submission to the finished ledger row (ClickException if it fails)."""
    settings = app.extensions["ffworker"].settings
    engine = app.extensions["ffworker"].engine
    client = Client(f"http://127.0.0.1:{port}", _demo_key(engine, settings.media_root))
    clip = _clip(Path(settings.media_root) / "demo", seconds)
    started = []
    try:
        if not client.healthy():
            started.append(_start("web", [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "ffworker/gunicorn_conf.py"),
                                          "--bind", f"127.0.0.1:{port}", "ffworker.app:create_app()"]))
        queue_consumed = partial(_queue_consumed, app.extensions["celery"], settings.task_queue)
        if not queue_consumed():
            started.append(_start("worker", [sys.executable, "-m", "celery", "-A", "ffworker.celery_app", "worker",
                                             "-O", "fair", "--prefetch-multiplier", "1", "--concurrency", "2",
                                             "--loglevel", "WARNING"]))
        _wait_for(client.healthy, "the web process", 30)
        _wait_for(queue_consumed, f"a worker consuming {settings.task_queue!r}", 30)
        output = f"out/demo-360p-{uuid.uuid4().hex[:8]}.mp4"
        job = api_call(lambda: client.submit({"kind": "transcode", "input": clip.name, "output": output,
                                              "preset": "h264-360p"}))
        err_console.print(f"submitted transcode [bold]{job['id']}[/] {clip.name} → {output}")
        job = follow(client, job["id"])
    finally:
        for proc in started:
            process.stop_service(proc)
    _print_ledger_row(engine, job["id"])
    if job["status"] != "completed":
        raise click.ClickException(f"the demo job ended {job['status']}: {job.get('error')}")


def _demo_key(engine, media_root) -> str:
    try:
        return create_tenant(engine, "demo", media_root)[1]
    except TenantError:  # the tenant exists: a key of its own for this run
        return issue_key(engine, "demo")


def _clip(media: Path, seconds: int) -> Path:
    media.mkdir(parents=True, exist_ok=True)
    clip = media / "demo-720p.mp4"
    if not clip.exists():
        if shutil.which(process.FFMPEG) is None:
            raise click.ClickException("ffmpeg is not installed (run `make demo`, which installs it)")
        err_console.print(f"generating a {seconds} s 720p test clip")
        process.generate_clip(clip, seconds)
    return clip


def _queue_consumed(celery, queue: str) -> bool:
    """Does a live worker consume ``queue``? (Celery's remote control; one second at most.)"""
    try:
        replies = celery.control.inspect(timeout=1.0).active_queues() or {}
    except Exception:  # the broker is away: no worker can be consuming
        return False
    return any(q.get("name") == queue for queues in replies.values() for q in queues or [])


def _start(name: str, argv: list[str]):
    """Start a stack process with its output in var/log/, away from the progress bar."""
    log_dir = ROOT / "var" / "log"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"demo-{name}.log"
    err_console.print(f"starting {name} ({' '.join(argv[2:4])}); its log: {log_path.relative_to(ROOT)}")
    return process.start_service(argv, log_path, cwd=ROOT)


def _wait_for(check, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise click.ClickException(f"{what} did not come up within {timeout_s:.0f} s")
        time.sleep(0.2)


def _print_ledger_row(engine, job_id: str) -> None:
    from sqlalchemy import text

    with engine.connect() as conn:
        row = conn.execute(text("SELECT * FROM jobs WHERE id = :id"), {"id": job_id}).mappings().one()
        events = conn.execute(
            text("SELECT at, from_status, to_status, attempt, reason FROM job_events WHERE job_id = :id ORDER BY id"),
            {"id": job_id},
        ).all()
    table = Table("column", "value", title="the finished ledger row (jobs)")
    for column, value in row.items():
        table.add_row(column, json.dumps(value, default=str) if isinstance(value, (dict, list)) else str(value))
    console.print(table)
    trail = Table("at", "from", "to", "attempt", "reason", title="job_events")
    for event in events:
        trail.add_row(*(str(v) for v in event))
    console.print(trail)
