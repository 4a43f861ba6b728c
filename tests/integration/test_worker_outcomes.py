"""How a run ends when something unusual happens: every run ends with a ledger write, the
right failures are retried, finished encodes are not run again, and slow probes are
heartbeaten and bound by the job's deadline.

Runs happen in this process against the real PostgreSQL, with real ffmpeg and ffprobe
(or small real scripts standing in for them where the test needs a slow or broken one).
"""
from __future__ import annotations

import dataclasses
import logging
import socket
import stat
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from ffworker import kinds, paths, process, worker
from ffworker.ledger import Ledger
from tests.helpers import wait_until
from tests.integration.test_ledger import backdate, new_job, transitions
from tests.integration.test_worker_crash import DiesBeforeRecordingCompletion, WorkerDied

pytestmark = pytest.mark.integration

TRANSCODE = {"input": "in.mp4", "output": "out/small.mp4", "video": {"codec": "h264", "height": 120}}


def temp_files(media: Path) -> list[str]:
    return sorted(p.name for p in media.rglob("*") if paths.TEMP_MARKER in p.name)


def script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def requeue(engine, ledger, job_id, token) -> None:
    """The attempt is lost (as the reaper would decide) and the retry is due at once."""
    ledger.fail(job_id, token, code="stale", message="no heartbeat", retryable=True)
    backdate(engine, job_id, run_after=1)


# -- every run ends with a ledger write ------------------------------------------------


def test_a_name_too_long_for_the_filesystem_fails_the_job_at_once(engine, ledger, settings, tenant, make_clip):
    # Submit refuses such a name now; a row from before that rule (or written by SQL) must
    # still end. concat's list file is the first name the run creates: ENAMETOOLONG there,
    # and again when the temp output (an equally long name) is removed.
    make_clip(tenant.media / "a.mp4")
    make_clip(tenant.media / "b.mp4")
    name = "n" * 226 + ".mp4"
    job = new_job(ledger, tenant, kind="concat", spec={"inputs": ["a.mp4", "b.mp4"], "output": name, "mode": "copy"})

    report = worker.run(job["id"], ledger, settings)

    row = ledger.get(job["id"])
    assert (report.outcome, row["status"], row["attempts"]) == ("failed", "failed", 1)
    assert row["error_code"] == "io_error"  # ENAMETOOLONG: deterministic, not retried
    assert str(tenant.media) not in row["error_message"] and name not in row["error_message"]
    assert transitions(ledger, job["id"])[-1] == ("running", "failed", 1)
    assert temp_files(tenant.media) == []


def test_an_unexpected_error_in_a_planner_fails_the_job_once_as_internal_error(
        engine, ledger, settings, tenant, make_clip, monkeypatch, caplog):
    make_clip(tenant.media / "in.mp4")
    real = kinds.get("transcode")

    def plan_then_trip(ctx):
        ctx.output("out/small.mp4")  # a temp name is handed out before the fault
        return {}["a key no plan has"]

    monkeypatch.setitem(kinds.KINDS, "transcode", dataclasses.replace(real, plan=plan_then_trip))
    job = new_job(ledger, tenant, kind="transcode", spec=TRANSCODE)

    with caplog.at_level(logging.ERROR, logger="ffworker.worker"):
        report = worker.run(job["id"], ledger, settings)

    row = ledger.get(job["id"])
    assert (report.outcome, row["status"], row["error_code"]) == ("failed", "failed", "internal_error")
    assert transitions(ledger, job["id"]) == [(None, "queued", 0), ("queued", "running", 1), ("running", "failed", 1)]
    assert "KeyError" in row["error_message"] and "/" not in row["error_message"]
    assert "Traceback" in row["stderr_tail"] and "plan_then_trip" in row["stderr_tail"]
    assert "event=internal_error" in caplog.text and "Traceback" in caplog.text
    assert temp_files(tenant.media) == []


# -- deterministic failures are not retried ------------------------------------------------


def test_an_output_below_an_existing_file_fails_at_once(engine, ledger, settings, tenant, make_clip):
    make_clip(tenant.media / "in.mp4")
    job = new_job(ledger, tenant, kind="transcode", spec={**TRANSCODE, "output": "in.mp4/out.mp4"})

    report = worker.run(job["id"], ledger, settings)

    row = ledger.get(job["id"])
    assert (report.outcome, row["status"], row["attempts"]) == ("failed", "failed", 1), row["error_message"]
    assert "'in.mp4' is a file, not a directory" in row["error_message"]


# -- the attempt that claims a job removes its predecessors' temp files -------------------


def test_a_retry_removes_the_temp_files_its_predecessors_left(engine, ledger, settings, tenant, make_clip,
                                                               monkeypatch):
    make_clip(tenant.media / "in.mp4")
    job = new_job(ledger, tenant, kind="transcode", spec=TRANSCODE)
    other = new_job(ledger, tenant, kind="transcode", spec={**TRANSCODE, "output": "out/other.mp4"})
    final = tenant.media / "out/small.mp4"
    final.parent.mkdir(parents=True)
    first = ledger.claim(job["id"], "w-killed")
    left = [paths.temp_path_for(final, str(job["id"]), first.token),
            paths.temp_path_for(final.with_name("small.mp4.ffconcat"), str(job["id"]), first.token)]
    for path in left:
        path.write_bytes(b"partial output of a killed run")
    not_ours = paths.temp_path_for(final.with_name("other.mp4"), str(other["id"]), 1)
    not_ours.write_bytes(b"another job's")
    requeue(engine, ledger, job["id"], first.token)

    # What the folder holds when this attempt's ffmpeg starts. (Not at its first heartbeat: on a
    # loaded machine the input's probe outlasts a progress interval and heartbeats before the
    # planner names the output, which is when the sweep runs.)
    seen_when_encoding_starts = []
    run_ffmpeg = process.run_ffmpeg

    def watched_run_ffmpeg(*args, **kwargs):
        seen_when_encoding_starts.append([path.exists() for path in left])
        return run_ffmpeg(*args, **kwargs)

    monkeypatch.setattr(process, "run_ffmpeg", watched_run_ffmpeg)
    report = worker.run(job["id"], ledger, settings)

    assert report.outcome == "completed", report.row and report.row["error_message"]
    assert seen_when_encoding_starts == [[False, False]]
    assert not any(path.exists() for path in left)
    assert not_ours.exists()


# -- a finished encode is not run again -------------------------------------------------------


def test_a_retry_completes_from_intact_placed_outputs_without_encoding(
        engine, ledger, settings, tenant, make_clip, tmp_path, monkeypatch, caplog):
    make_clip(tenant.media / "in.mp4", seconds=1)
    job = new_job(ledger, tenant, kind="transcode", spec=TRANSCODE)
    output = tenant.media / "out/small.mp4"
    with pytest.raises(WorkerDied):  # outputs placed, completion never written
        worker.run(job["id"], DiesBeforeRecordingCompletion(engine), settings)
    placed = output.stat()
    requeue(engine, ledger, job["id"], 1)
    # Encoding again is impossible: the next attempt can only complete from what is placed.
    monkeypatch.setattr(process, "FFMPEG", script(tmp_path / "ffmpeg", "exit 1"))

    with caplog.at_level(logging.INFO, logger="ffworker.worker"):
        report = worker.run(job["id"], ledger, settings)

    assert report.outcome == "completed", report.row and report.row["error_message"]
    assert "event=outputs_reused" in caplog.text
    row = ledger.get(job["id"])
    assert (row["status"], row["attempts"]) == ("completed", 2)
    [described] = row["result"]["outputs"]
    assert (described["path"], described["height"], described["size_bytes"]) == ("out/small.mp4", 120, placed.st_size)
    assert (output.stat().st_ino, output.stat().st_mtime_ns) == (placed.st_ino, placed.st_mtime_ns)
    assert temp_files(tenant.media) == []


def test_a_retry_encodes_again_when_the_placed_output_was_changed(
        engine, ledger, settings, tenant, make_clip, caplog):
    make_clip(tenant.media / "in.mp4", seconds=1)
    job = new_job(ledger, tenant, kind="transcode", spec=TRANSCODE)
    output = tenant.media / "out/small.mp4"
    with pytest.raises(WorkerDied):
        worker.run(job["id"], DiesBeforeRecordingCompletion(engine), settings)
    with output.open("ab") as placed:
        placed.write(b"\0" * 100)  # not what the attempt described any more
    requeue(engine, ledger, job["id"], 1)

    with caplog.at_level(logging.INFO, logger="ffworker.worker"):
        report = worker.run(job["id"], ledger, settings)

    assert report.outcome == "completed", report.row and report.row["error_message"]
    assert "event=outputs_reused" not in caplog.text
    assert ledger.get(job["id"])["result"]["outputs"][0]["size_bytes"] == output.stat().st_size


class Proxy:
    """A TCP proxy to PostgreSQL that the test can cut: open connections are dropped and
    new ones refused until the outage ends."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.down_until = 0.0
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if time.monotonic() < self.down_until:
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self, seconds: float) -> None:
        self.down_until = time.monotonic() + seconds
        with self.lock:
            cut, self.sockets = self.sockets, []
        for end in cut:
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()
        self.cut(0)


def test_a_database_outage_at_completion_is_waited_out_not_encoded_again(
        engine, ledger, settings, tenant, make_clip):
    make_clip(tenant.media / "in.mp4", seconds=1)
    job = new_job(ledger, tenant, kind="transcode", spec=TRANSCODE)
    proxy = Proxy("127.0.0.1", make_url(settings.database_url).port or 5432)
    proxied = create_engine(make_url(settings.database_url).set(host="127.0.0.1", port=proxy.port),
                            pool_pre_ping=True)
    outage_s = 7.0  # longer than the few seconds of retries a write used to get

    class OutageAtPlacement(Ledger):
        cut = False

        def heartbeat(self, *args, placing_outputs=False, **kwargs):
            if placing_outputs and not self.cut:  # ffmpeg has succeeded: the database goes away now
                self.cut = True
                proxy.cut(outage_s)
            return super().heartbeat(*args, placing_outputs=placing_outputs, **kwargs)

    try:
        started = time.monotonic()
        report = worker.run(job["id"], OutageAtPlacement(proxied), settings)
        waited = time.monotonic() - started
    finally:
        proxied.dispose()
        proxy.close()

    assert report.outcome == "completed", report.row and (report.row["status"], report.row["error_message"])
    assert waited >= outage_s
    assert transitions(ledger, job["id"]) == [
        (None, "queued", 0), ("queued", "running", 1), ("running", "completed", 1)]
    assert (tenant.media / "out/small.mp4").exists() and temp_files(tenant.media) == []


# -- probes are heartbeaten and bound by the job's deadline -------------------------------


def test_a_job_past_its_timeout_inside_ffprobe_fails_with_timeout(
        engine, ledger, settings, tenant, make_clip, tmp_path, monkeypatch):
    make_clip(tenant.media / "in.mp4")
    monkeypatch.setattr(process, "FFPROBE", script(tmp_path / "ffprobe", f'sleep 5\nexec ffprobe "$@"'))
    job = new_job(ledger, tenant, kind="probe", spec={"input": "in.mp4"}, timeout_s=1)

    started = time.monotonic()
    report = worker.run(job["id"], ledger, settings)

    row = ledger.get(job["id"])
    assert (report.outcome, row["status"], row["error_code"]) == ("failed", "failed", "timeout"), row["error_message"]
    assert time.monotonic() - started < 4  # the probe was killed at the deadline


def test_a_slow_probe_keeps_the_job_heartbeating(engine, ledger, settings, tenant, make_clip, tmp_path, monkeypatch):
    make_clip(tenant.media / "in.mp4")
    probe_s = 2.0  # many progress intervals (0.25 s in the tests)
    monkeypatch.setattr(process, "FFPROBE", script(tmp_path / "ffprobe", f'sleep {probe_s}\nexec ffprobe "$@"'))
    job = new_job(ledger, tenant, kind="probe", spec={"input": "in.mp4"})
    reports = []
    run = threading.Thread(target=lambda: reports.append(worker.run(job["id"], ledger, settings)))

    ages = []
    run.start()
    while run.is_alive():
        with engine.connect() as conn:
            age = conn.execute(text("SELECT extract(epoch FROM now() - heartbeat_at) FROM jobs "
                                    "WHERE id = :id AND status = 'running'"), {"id": job["id"]}).scalar()
        if age is not None:
            ages.append(float(age))
        time.sleep(0.05)
    run.join()

    assert reports[0].outcome == "completed"
    assert len(ages) > 10 and max(ages) < 4 * settings.progress_interval_s, max(ages)


def test_a_cancel_during_a_slow_probe_stops_it_within_two_seconds(
        engine, ledger, settings, tenant, make_clip, tmp_path, monkeypatch):
    make_clip(tenant.media / "in.mp4")
    monkeypatch.setattr(process, "FFPROBE", script(tmp_path / "ffprobe", 'sleep 10\nexec ffprobe "$@"'))
    job = new_job(ledger, tenant, kind="probe", spec={"input": "in.mp4"})
    reports = []
    run = threading.Thread(target=lambda: reports.append(worker.run(job["id"], ledger, settings)))
    run.start()
    wait_until(lambda: ledger.get(job["id"])["status"] == "running")

    ledger.request_cancel(job["id"], tenant.id)
    cancelled_at = time.monotonic()
    run.join(timeout=15)

    assert reports and reports[0].outcome == "cancelled"
    assert time.monotonic() - cancelled_at < 2.0
    assert ledger.get(job["id"])["status"] == "cancelled"
