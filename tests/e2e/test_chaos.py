"""Chaos: a worker killed with its whole process group mid-encode, and the job queue purged,
while real beat maintenance (reaper, re-dispatch) runs with fast thresholds.

Thirty short transcodes must all complete exactly once, with valid outputs, no
temporary files left behind and no ffmpeg outliving the worker that started it. The run is
made on both supported brokers: Redis (the default) and RabbitMQ (a queue of the run's own).
"""
from __future__ import annotations

import os
import signal
import socket
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import text

from ffworker import paths, process
from ffworker.celery_wiring import maintenance_queue
from ffworker.maintenance import prune
from ffworker.tenants import set_limits
from tests.conftest import BeatProcess, WorkerProcess
from tests.e2e.test_worker import leftovers, submit
from tests.helpers import ffmpeg_processes_touching, make_celery_current, stop_fleet, wait_until

pytestmark = pytest.mark.e2e

JOBS = 30
CLIP_S = 2.0
FAST_RECOVERY = {
    "FFWORKER_STALE_AFTER_S": "3",
    # When only the killed runs are running, the silent fleet arms the reaper once: this grace
    # is then what they wait beyond the stale threshold.
    "FFWORKER_REAPER_GRACE_S": "8",
    "FFWORKER_MAINTENANCE_INTERVAL_S": "1",
    "FFWORKER_REDISPATCH_AFTER_S": "3",
}
COMPLETION_TIMEOUT_S = 60.0


RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"


@pytest.fixture(params=["redis", "rabbitmq"])
def broker(request, app, settings, purge_queue):
    """(app, settings, environment of the child processes) for one broker.

    Redis is the session's own; for RabbitMQ an API app of its own publishes to a queue of
    this run's own, deleted at the end (RabbitMQ keeps durable queues until told otherwise).
    """
    if request.param == "redis":
        yield app, settings, dict(FAST_RECOVERY)
        return
    from ffworker.app import create_app

    own = settings.with_overrides(broker_url=RABBITMQ_URL, task_queue=f"{settings.task_queue}-amqp")
    amqp_app = create_app({"TESTING": True, "FFWORKER_SETTINGS": own})
    try:
        yield amqp_app, own, {**FAST_RECOVERY, "FFWORKER_BROKER_URL": own.broker_url,
                              "FFWORKER_TASK_QUEUE": own.task_queue}
    finally:
        try:
            with amqp_app.extensions["celery"].connection_for_write() as conn:
                for queue in (own.task_queue, maintenance_queue(own)):
                    conn.default_channel.queue_delete(queue)
        except Exception as exc:
            print(f"could not delete the RabbitMQ queues: {exc!r}")
        amqp_app.extensions["ffworker_events"].hub.close()
        make_celery_current(app)


@pytest.fixture
def fleet(broker):
    """Processes the test starts; each is stopped group-wide (SIGTERM, then SIGKILL) at teardown."""
    app, settings, _ = broker
    processes: list = []
    yield processes
    stop_fleet(processes, app, settings)  # beat first: no new maintenance messages while the workers stop


def process_table() -> dict[int, tuple[str, int, int]]:
    """pid → (command name, parent pid, process group) of every live (not zombie) process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        state, ppid, pgrp = stat[stat.rindex(")") + 2:].split()[:3]
        if state != "Z":
            table[int(entry.name)] = (name, int(ppid), int(pgrp))
    return table


def pool_and_ffmpeg(worker: WorkerProcess, table) -> tuple[set[int], set[int]]:
    """The worker's pool processes, and the ffmpeg processes they started."""
    pool = {pid for pid, (_, _, pgrp) in table.items() if pgrp == worker.pgid and pid != worker.pgid}
    ffmpeg = {pid for pid, (name, ppid, _) in table.items() if name == "ffmpeg" and ppid in pool}
    return pool, ffmpeg


def live_ffmpeg(runs) -> list[int]:
    """ffmpeg processes writing the temp output of any of these (job id, attempt) runs."""
    return [pid for job_id, attempt in runs for pid in ffmpeg_processes_touching(f"{job_id}.{attempt}.")]


def writing_output(pid: int) -> bool:
    """Whether this ffmpeg has created its (temporary) output file yet."""
    try:
        output = (Path("/proc") / str(pid) / "cmdline").read_bytes().rstrip(b"\0").split(b"\0")[-1]
    except OSError:
        return False
    return os.path.exists(output)


def completed_count(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM jobs WHERE status = 'completed'")).scalar_one()


def report(figures: dict) -> str:
    return "chaos figures: " + ", ".join(f"{key}={value}" for key, value in figures.items())


def test_thirty_transcodes_survive_a_killed_worker_and_a_purged_queue(
        broker, ledger, engine, tenant, make_clip, fleet, tmp_path):
    app, settings, env = broker
    client = app.test_client()
    started = time.monotonic()
    host = socket.gethostname()
    make_clip(tenant.media / "in.mp4", seconds=CLIP_S, size="320x240")
    # Room for every worker process to encode at once (by default a tenant runs 2 transcodes).
    set_limits(engine, tenant.name, slots=2 * 6)
    outputs = [f"out/clip-{n:02d}.mp4" for n in range(JOBS)]
    queues = [settings.task_queue]

    # Started without waiting, so that teardown stops them even if one never gets ready.
    fleet.append(BeatProcess(tmp_path / "beat-schedule", tmp_path / "beat.log", env=env, wait=False))
    # Maintenance runs in a process of its own, as the Procfile's `maintenance`: busy encoders
    # would hold its rounds back long enough for the reaper to count them as missed and arm.
    fleet.append(WorkerProcess(settings, tmp_path / "maintenance.log", concurrency=1, name="chaos-maintenance",
                               queues=[maintenance_queue(settings)], env=env, wait=False))
    workers = [WorkerProcess(settings, tmp_path / f"worker-{name}.log", concurrency=2, name=f"chaos-{name}",
                             queues=queues, env=env, wait=False) for name in ("a", "b")]
    fleet.extend(workers)
    for proc in fleet:
        proc.wait_ready()
    # The reaper ran just now and is not armed; beat keeps it fresh from here on. (Set once the
    # fleet is up: a start-up slower than the stale threshold would otherwise read as missed
    # rounds, and arm the reaper's grace period over the kill.)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO maintenance_state (name, last_run_at) VALUES ('reaper', now()) "
                          "ON CONFLICT (name) DO UPDATE SET last_run_at = now(), armed_at = NULL"))

    job_ids = [submit(client, tenant, kind="transcode", input="in.mp4", output=output, preset="h264-360p")["id"]
               for output in outputs]

    # -- the kill: mid-encode, once some jobs have completed -----------------------------------------
    picking_since = time.monotonic()

    def kill_a_busy_worker():
        if completed_count(engine) < 4:
            return None
        table = process_table()
        # Two encodes at once, one of them with its temp output written, is likely; if not, one encode will do.
        strict = time.monotonic() - picking_since < 10
        for worker in workers:
            pool, ffmpeg = pool_and_ffmpeg(worker, table)
            if (len(ffmpeg) >= 2 and any(writing_output(pid) for pid in ffmpeg)) or (ffmpeg and not strict):
                os.killpg(worker.pgid, signal.SIGKILL)  # the worker and its pool at once, as a crashed host
                return worker, pool, ffmpeg
        return None

    try:
        victim, pool, killed_ffmpeg = wait_until(kill_a_busy_worker, 20, interval_s=0.01)
    except AssertionError:
        pytest.fail(f"no worker was encoding within 20 s; {completed_count(engine)} of {JOBS} jobs completed")
    with engine.connect() as conn:
        killed_at = conn.execute(text("SELECT now()")).scalar_one()
        killed_runs = [(job_id, attempt) for job_id, attempt in conn.execute(
            text("SELECT id::text, attempts FROM jobs WHERE status = 'running' AND worker = ANY(:names)"),
            {"names": [f"{host}:{pid}" for pid in pool]})]
    victim.proc.wait(timeout=10)

    # Its ffmpeg processes die with their parents (PR_SET_PDEATHSIG), not seconds later.
    def orphans() -> list[int]:
        table = process_table()
        return sorted({pid for pid in killed_ffmpeg if table.get(pid, ("",))[0] == "ffmpeg"}
                      | set(live_ffmpeg(killed_runs)))

    try:
        wait_until(lambda: not orphans(), 2.0, interval_s=0.02)
    except AssertionError:
        pass
    orphans_after_kill = orphans()
    temp_after_kill = [name for name in leftovers(tenant.media) if paths.parse_temp_name(name) in set(killed_runs)]

    # -- some messages lost: the job queue purged once, then a replacement worker -------------------
    with app.extensions["celery"].connection_for_write() as conn:
        channel = conn.default_channel
        queued_messages = channel.queue_declare(queue=settings.task_queue, passive=True).message_count
        purged = channel.queue_purge(settings.task_queue)
    fleet.append(WorkerProcess(settings, tmp_path / "worker-c.log", concurrency=2, name="chaos-c",
                               queues=queues, env=env, wait=False))
    fleet[-1].wait_ready()

    # -- recovery -------------------------------------------------------------------------------------
    def all_terminal() -> bool:
        with engine.connect() as conn:
            return not conn.execute(text("SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')")).scalar()

    try:
        wait_until(all_terminal, COMPLETION_TIMEOUT_S, interval_s=0.2)
    except AssertionError:
        pass  # reported below, with the figures
    with engine.connect() as conn:
        rows = {job_id: (status, error) for job_id, status, error in conn.execute(
            text("SELECT id::text, status, error_code FROM jobs"))}
        events = conn.execute(text(
            "SELECT job_id::text, from_status, to_status, attempt, at FROM job_events ORDER BY id")).all()
    completions = Counter(e.job_id for e in events if (e.from_status, e.to_status) == ("running", "completed"))
    killed = dict(killed_runs)
    rerun_at = [e.at for e in events if e.job_id in killed and (e.from_status, e.to_status) == ("queued", "running")
                and e.attempt > killed[e.job_id]]
    with app.app_context():
        removed = prune.remove_orphaned_temp_files(ledger, settings.media_root, min_age_s=0)
    media = os.path.realpath(tenant.media)
    ffmpeg_left = sorted(set(ffmpeg_processes_touching(media) + ffmpeg_processes_touching(str(tenant.media))))
    not_completed = {job_id: rows.get(job_id) for job_id in job_ids if rows.get(job_id, ("absent",))[0] != "completed"}

    figures = {
        "broker": settings.broker_url.split(":", 1)[0],
        "jobs": len(job_ids),
        "workers_killed": 1,
        "jobs_running_on_killed_worker": len(killed_runs),
        "ffmpeg_killed_with_worker": len(killed_ffmpeg),
        "ffmpeg_orphans_after_kill": len(orphans_after_kill),
        "messages_queued_before_purge": queued_messages,
        "messages_purged": purged,
        "jobs_lost": len(not_completed),
        "duplicated_completions": sum(n - 1 for n in completions.values() if n > 1),
        "temp_files_left_by_killed_runs": len(temp_after_kill),
        "orphan_temp_files_removed": len(removed),
        "ffmpeg_orphans_at_end": len(ffmpeg_left),
        "kill_to_rerun_s": round((min(rerun_at) - killed_at).total_seconds(), 2) if rerun_at else None,
        "runtime_s": round(time.monotonic() - started, 1),
    }
    summary = report(figures)
    print("\n" + summary)

    assert killed_runs, f"the killed worker was running no job; {summary}"
    assert orphans_after_kill == [], f"ffmpeg outlived its killed worker: pids {orphans_after_kill}; {summary}"
    assert not_completed == {}, f"jobs not completed within {COMPLETION_TIMEOUT_S:g} s: {not_completed}; {summary}"
    assert {job_id: completions[job_id] for job_id in job_ids} == {job_id: 1 for job_id in job_ids}, \
        f"each job must complete exactly once; {summary}"
    for job_id, attempt in killed_runs:  # each killed run was reaped, and the job ran again
        runs = [(e.from_status, e.to_status, e.attempt) for e in events if e.job_id == job_id]
        assert ("running", "queued", attempt) in runs and ("running", "completed", attempt) not in runs, \
            f"job {job_id}: {runs}; {summary}"
    assert figures["kill_to_rerun_s"] is not None, summary
    for output in outputs:
        path = tenant.media / output
        assert path.is_file(), f"{output} missing; {summary}"
        probe = process.ffprobe(str(path))
        assert float(probe["format"]["duration"]) == pytest.approx(CLIP_S, abs=0.15), f"{output}: {probe['format']}"
        assert {s["codec_type"] for s in probe["streams"]} == {"video", "audio"}, output
    assert {paths.parse_temp_name(Path(p).name) for p in removed} <= set(killed_runs), \
        f"temp files of runs that were not killed: {removed}; {summary}"
    assert leftovers(tenant.media) == [], summary
    assert ffmpeg_left == [], f"ffmpeg processes left running: {ffmpeg_left}; {summary}"
