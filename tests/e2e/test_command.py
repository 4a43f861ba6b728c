"""command (raw ffmpeg argv) through the whole stack, off and on."""
from __future__ import annotations

import os
import subprocess

import pytest
from sqlalchemy import text

from ffworker import process
from ffworker.kinds import command
from tests.conftest import WorkerProcess
from tests.e2e.test_worker import finished, leftovers, submit
from tests.helpers import make_celery_current

pytestmark = pytest.mark.e2e


@pytest.fixture
def raw_commands(app, monkeypatch):
    """Turn FFWORKER_ALLOW_RAW_COMMANDS on for the API (the session worker keeps it off)."""
    services = app.extensions["ffworker"]
    monkeypatch.setattr(services, "settings", services.settings.with_overrides(allow_raw_commands=True))


@pytest.fixture(scope="module")
def raw_app(settings, app):
    """An API whose jobs go to a queue of their own, served by a worker with raw commands on."""
    from ffworker.app import create_app

    raw_settings = settings.with_overrides(allow_raw_commands=True, task_queue=f"{settings.task_queue}-raw")
    raw = create_app({"TESTING": True, "FFWORKER_SETTINGS": raw_settings})
    make_celery_current(app)  # the session's app stays Celery's current one
    return raw


@pytest.fixture(scope="module")
def raw_worker(raw_app, settings, tmp_path_factory):
    queue = raw_app.extensions["ffworker"].settings.task_queue
    worker = WorkerProcess(settings, tmp_path_factory.mktemp("logs") / "raw-worker.log", concurrency=1, name="raw",
                           queues=[queue], env={"FFWORKER_ALLOW_RAW_COMMANDS": "1", "FFWORKER_TASK_QUEUE": queue})
    yield worker
    worker.kill()  # idle by now: no need to wait for a warm shutdown
    worker.log.close()


def job_count(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM jobs")).scalar_one()


def test_disabled_by_default_with_a_message_naming_the_setting(app, client, tenant, make_clip, engine, monkeypatch):
    services = app.extensions["ffworker"]
    monkeypatch.setattr(services, "settings", services.settings.with_overrides(allow_raw_commands=False))
    make_clip(tenant.media / "cmd/in.mp4", seconds=1)
    response = client.post("/v1/jobs", headers=tenant.headers,
                           json={"kind": "command", "args": ["-i", "cmd/in.mp4", "cmd/out.mp4"]})
    assert response.status_code == 422
    assert "FFWORKER_ALLOW_RAW_COMMANDS" in response.json["message"]
    assert "kind" in response.json["errors"]
    assert job_count(engine) == 0


HOSTILE = [
    ["-i", "../globex/secret.mp4", "cmd/stolen.mp4"],
    ["-i", "cmd/escape.mp4", "cmd/stolen.mp4"],                          # symlink to another tenant's file
    ["-i", "cmd/in.mp4", "cmd/escape_dir/planted.mp4"],                  # symlinked directory outside
    ["-i", "/etc/passwd", "cmd/out.mp4"],
    ["-i", "cmd/in.mp4", "/tmp/planted.mp4"],
    ["-i", "http://169.254.169.254/latest/meta-data/", "cmd/out.mp4"],
    ["-i", "concat:cmd/in.mp4|../globex/secret.mp4", "cmd/out.mp4"],
    ["-i", "cmd/in.mp4", "pipe:1"],
    ["-f", "lavfi", "-i", "movie=../globex/secret.mp4", "cmd/out.mp4"],
    ["-f", "lavfi", "-i", "amovie=/etc/passwd", "cmd/out.mp3"],
    ["-i", "cmd/in.mp4", "-filter_complex", "movie=../globex/secret.mp4[s];[0:v][s]overlay", "cmd/out.mp4"],
    ["-i", "cmd/in.mp4", "-vf", "drawtext=textfile=/etc/passwd", "cmd/out.mp4"],
    ["-i", "cmd/in.mp4", "-filter_complex_script", "cmd/graph.txt", "cmd/out.mp4"],
    ["-i", "cmd/in.mp4", "-/filter_complex", "cmd/graph.txt", "cmd/out.mp4"],
    ["-dump_attachment:t", "", "-i", "cmd/in.mp4", "cmd/out.mp4"],
    ["-i", "cmd/in.mp4", "-pass", "1", "-passlogfile", "/tmp/stats", "cmd/out.mp4"],
    ["-report", "-i", "cmd/in.mp4", "cmd/out.mp4"],
    ["-i", "cmd/in.mp4", "-f", "hls", "-hls_segment_filename", "/tmp/seg%d.ts", "cmd/out.mp4"],
    ["-i", "cmd/in.mp4", "cmd/out.m3u8"],
    ["-i", "cmd/in.mp4", "-attach", "../globex/secret.mp4", "cmd/out.mkv"],
    ["-i", "cmd/in.mp4", "cmd/in.mp4"],
]


@pytest.mark.parametrize("args", HOSTILE, ids=lambda a: " ".join(a)[:70])
def test_hostile_argv_is_422_and_never_queued(client, tenant, other_tenant, make_clip, engine, settings,
                                              raw_commands, args):
    make_clip(tenant.media / "cmd/in.mp4", seconds=1)
    make_clip(other_tenant.media / "secret.mp4", seconds=1)
    for target, link in ((other_tenant.media / "secret.mp4", tenant.media / "cmd/escape.mp4"),
                         (other_tenant.media, tenant.media / "cmd/escape_dir")):
        if not os.path.lexists(link):
            os.symlink(target, link)
    response = client.post("/v1/jobs", headers=tenant.headers,
                           json={"kind": "command", "args": args, "overwrite": True})
    assert response.status_code == 422, response.json
    assert "args" in response.json["errors"]
    assert str(settings.media_root) not in response.get_data(as_text=True)
    assert job_count(engine) == 0


def test_a_legitimate_argv_runs_and_its_outputs_are_described(raw_app, raw_worker, tenant, make_clip):
    client = raw_app.test_client()
    make_clip(tenant.media / "cmd/in.mp4", seconds=2, size="320x240")
    args = ["-y", "-i", "cmd/in.mp4", "-filter_complex",
            "[0:v]split[a][b];[a]scale=160:-2[small];[b]fps=5,scale=80:-1,split[g1][g2];"
            "[g1]palettegen[p];[g2][p]paletteuse=dither=bayer[gif]",
            "-map", "[small]", "-map", "0:a", "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac",
            "cmd/out/small.mp4", "-map", "[gif]", "cmd/out/preview.gif"]
    job = submit(client, tenant, kind="command", args=args)
    done = finished(client, tenant, job["id"])
    assert done["status"] == "completed", done["error"]
    small, gif = done["result"]["outputs"]
    assert small["path"] == "cmd/out/small.mp4" and (small["width"], small["height"]) == (160, 120)
    assert small["video_codec"] == "h264" and small["audio_codec"] == "aac"
    assert small["duration_s"] == pytest.approx(2.0, abs=0.1)
    assert gif["path"] == "cmd/out/preview.gif" and gif["video_codec"] == "gif" and gif["width"] == 80
    assert process.ffprobe(str(tenant.media / "cmd/out/preview.gif"))["format"]["format_name"] == "gif"
    assert leftovers(tenant.media) == []


def test_an_argv_ffmpeg_rejects_fails_and_leaves_nothing(raw_app, raw_worker, tenant, make_clip, settings):
    client = raw_app.test_client()
    make_clip(tenant.media / "cmd/in.mp4", seconds=1)
    job = submit(client, tenant, kind="command", args=["-i", "cmd/in.mp4", "-c:v", "no_such_encoder", "cmd/bad.mp4"])
    done = finished(client, tenant, job["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "ffmpeg_failed"
    assert str(settings.media_root) not in done["error"]["message"]
    assert not (tenant.media / "cmd/bad.mp4").exists() and leftovers(tenant.media) == []


def test_a_worker_without_the_setting_refuses_to_run_a_command(worker, client, tenant, make_clip, raw_commands):
    make_clip(tenant.media / "cmd/in.mp4", seconds=1)
    job = submit(client, tenant, kind="command", args=["-i", "cmd/in.mp4", "-c", "copy", "cmd/refused.mp4"])
    done = finished(client, tenant, job["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "command_disabled"
    assert "FFWORKER_ALLOW_RAW_COMMANDS" in done["error"]["message"]
    assert not (tenant.media / "cmd/refused.mp4").exists()


def test_every_allowed_filter_exists_in_this_ffmpeg():
    listed = subprocess.run(["ffmpeg", "-hide_banner", "-filters"], capture_output=True, text=True).stdout
    names = {line.split()[1] for line in listed.splitlines() if len(line.split()) > 2 and "->" in line}
    assert command.FILTERS - names == set()
