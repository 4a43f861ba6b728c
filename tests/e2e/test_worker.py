"""Through the whole stack: REST API → ledger → Redis → a real Celery worker process → ffmpeg."""
from __future__ import annotations

import time

import pytest

from ffworker import process
from ffworker.dispatch import RUN_JOB
from tests.helpers import ffmpeg_processes_touching, wait_until

pytestmark = pytest.mark.e2e

TERMINAL = ("completed", "failed", "cancelled")


def submit(client, tenant, **body) -> dict:
    response = client.post("/v1/jobs", json=body, headers=tenant.headers)
    assert response.status_code == 202, response.json
    return response.json


def finished(client, tenant, job_id, timeout_s: float = 60) -> dict:
    def terminal():
        job = client.get(f"/v1/jobs/{job_id}", headers=tenant.headers).json
        return job if job["status"] in TERMINAL else None

    return wait_until(terminal, timeout_s, interval_s=0.1)


def events(ledger, job_id) -> list[tuple]:
    return [(e["from_status"], e["to_status"], e["attempt"]) for e in ledger.events(job_id)]


def leftovers(media) -> list[str]:
    return sorted(p.name for p in media.rglob("*") if ".ffwtmp." in p.name)


def test_transcode_reports_progress_while_running_and_completes(worker, client, ledger, tenant, make_clip):
    make_clip(tenant.media / "in.mp4", seconds=4, size="640x360")
    # An upscale with a slow preset: long enough (a few seconds) to watch it run.
    job = submit(client, tenant, kind="transcode", input="in.mp4", output="out/big.mp4",
                 video={"codec": "h264", "height": 720, "preset": "slow"}, audio={"codec": "aac"})

    def progress_while_running():
        row = ledger.get(job["id"])
        assert row["status"] in ("queued", "running"), row["error_message"]
        return row if row["status"] == "running" and row["progress_at"] is not None else None

    seen = wait_until(progress_while_running, 30)
    assert 0 < seen["progress_percent"] < 100
    assert seen["progress_out_time_s"] > 0

    done = finished(client, tenant, job["id"])
    assert done["status"] == "completed", done["error"]
    assert done["progress"]["percent"] == 100.0
    (output,) = done["result"]["outputs"]
    assert output["path"] == "out/big.mp4"
    assert (output["width"], output["height"]) == (1280, 720)
    assert output["video_codec"] == "h264" and output["audio_codec"] == "aac"
    assert output["duration_s"] == pytest.approx(4.0, abs=0.1)
    probe = process.ffprobe(str(tenant.media / "out/big.mp4"))
    assert {s["codec_type"] for s in probe["streams"]} == {"video", "audio"}
    assert leftovers(tenant.media) == []
    assert events(ledger, job["id"]) == [(None, "queued", 0), ("queued", "running", 1), ("running", "completed", 1)]


def test_preset_thumbnail_and_probe_complete(worker, client, tenant, make_clip):
    make_clip(tenant.media / "clip.mp4", seconds=2, size="320x240")
    jobs = [
        submit(client, tenant, kind="transcode", input="clip.mp4", output="clip-360.mp4", preset="h264-360p"),
        submit(client, tenant, kind="thumbnail", input="clip.mp4", output="thumb.png", width=160),
        submit(client, tenant, kind="probe", input="clip.mp4"),
        submit(client, tenant, kind="transcode", input="clip.mp4", output="clip.m4a", preset="audio-aac"),
    ]
    transcode, thumbnail, probe, audio = (finished(client, tenant, job["id"]) for job in jobs)
    assert [j["status"] for j in (transcode, thumbnail, probe, audio)] == ["completed"] * 4
    assert transcode["result"]["outputs"][0]["height"] == 360
    assert transcode["result"]["outputs"][0]["width"] == 480  # aspect kept, even width
    assert thumbnail["result"]["outputs"][0]["width"] == 160
    assert thumbnail["result"]["at_s"] == pytest.approx(0.2)
    media = probe["result"]["media"]
    assert media["duration_s"] == pytest.approx(2.0, abs=0.1)
    assert {s["type"] for s in media["streams"]} == {"video", "audio"}
    assert audio["result"]["outputs"][0]["video_codec"] is None
    assert audio["result"]["outputs"][0]["audio_codec"] == "aac"


def test_cancel_of_a_running_transcode_stops_ffmpeg_within_two_seconds(worker, client, ledger, tenant, make_clip):
    make_clip(tenant.media / "long.mp4", seconds=8, size="640x360")
    job = submit(client, tenant, kind="transcode", input="long.mp4", output="never.mp4",
                 video={"codec": "h264", "height": 1080, "preset": "veryslow"})
    wait_until(lambda: ledger.get(job["id"])["status"] == "running", 30)
    wait_until(lambda: ffmpeg_processes_touching(job["id"]), 10)

    requested = time.monotonic()
    response = client.post(f"/v1/jobs/{job['id']}/cancel", headers=tenant.headers)
    assert response.status_code == 202
    done = finished(client, tenant, job["id"], timeout_s=5)
    elapsed = time.monotonic() - requested
    assert done["status"] == "cancelled" and done["error"]["code"] == "cancelled"
    assert elapsed < 2.0
    assert ffmpeg_processes_touching(job["id"]) == []
    assert not (tenant.media / "never.mp4").exists()
    assert leftovers(tenant.media) == []
    assert events(ledger, job["id"])[-1] == ("running", "cancelled", 1)


def test_the_same_message_delivered_twice_runs_ffmpeg_once(worker, app, client, ledger, tenant, make_clip):
    make_clip(tenant.media / "dup.mp4", seconds=2)
    job = submit(client, tenant, kind="transcode", input="dup.mp4", output="dup-out.mp4", preset="h264-360p")
    celery = app.extensions["celery"]
    for _ in range(3):  # duplicates of the message the API already published
        celery.send_task(RUN_JOB, args=[job["id"]])
    done = finished(client, tenant, job["id"])
    assert done["status"] == "completed" and done["attempts"] == 1
    # All four messages are consumed; the three that lost the claim do nothing.
    skipped = f"job={job['id']} attempt=none event=skipped"
    wait_until(lambda: worker.log_path.read_text().count(skipped) == 3, 30)
    row = ledger.get(job["id"])
    assert (row["status"], row["attempts"]) == ("completed", 1)
    assert events(ledger, job["id"]) == [(None, "queued", 0), ("queued", "running", 1), ("running", "completed", 1)]


def test_invalid_media_fails_at_once_with_a_sanitized_error(worker, client, ledger, tenant, settings):
    (tenant.media / "broken.mp4").write_bytes(b"this is not a video" * 100)
    job = submit(client, tenant, kind="transcode", input="broken.mp4", output="x.mp4", preset="h264-360p")
    done = finished(client, tenant, job["id"])
    assert done["status"] == "failed" and done["attempts"] == 1
    assert done["error"]["code"] == "invalid_input"
    body = client.get(f"/v1/jobs/{job['id']}", headers=tenant.headers).get_data(as_text=True)
    assert str(settings.media_root) not in body and "stderr" not in body
    assert ledger.get(job["id"])["stderr_tail"]  # kept for operators, in the ledger only


def test_ffmpeg_rejecting_the_request_fails_with_ffmpeg_failed(worker, client, tenant, make_clip, settings):
    make_clip(tenant.media / "vp9.mp4", seconds=1, codec="libvpx-vp9", audio=False)
    # Stream-copying VP9 into QuickTime passes every submit-time rule; the mov muxer refuses it.
    job = submit(client, tenant, kind="transcode", input="vp9.mp4", output="copy.mov", video={"codec": "copy"})
    done = finished(client, tenant, job["id"])
    assert done["status"] == "failed", done
    assert done["error"]["code"] == "ffmpeg_failed"
    assert str(settings.media_root) not in done["error"]["message"]
    assert leftovers(tenant.media) == []


def test_a_job_past_its_timeout_is_killed_and_fails_with_timeout(worker, client, ledger, tenant, make_clip):
    make_clip(tenant.media / "long.mp4", seconds=8, size="640x360")
    job = submit(client, tenant, kind="transcode", input="long.mp4", output="late.mp4", timeout_s=1,
                 video={"codec": "h264", "height": 1080, "preset": "veryslow"})
    done = finished(client, tenant, job["id"], timeout_s=20)
    assert done["status"] == "failed" and done["error"]["code"] == "timeout"
    assert done["attempts"] == 1  # a timeout is not retried
    assert ffmpeg_processes_touching(job["id"]) == []
    assert not (tenant.media / "late.mp4").exists() and leftovers(tenant.media) == []
