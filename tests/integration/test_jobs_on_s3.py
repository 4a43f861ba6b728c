"""Jobs on object storage: a run downloads its inputs into a scratch directory of its own,
runs ffmpeg there, uploads its outputs, and removes the directory on every way out.

Runs happen in this process against the real PostgreSQL, real ffmpeg and a real S3 server
(SeaweedFS, tests/s3server.py). Inputs are put into the bucket with boto3 directly.
"""
from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from sqlalchemy import text

from ffworker import delivery, process, s3, staging, worker
from ffworker.kinds.base import Output
from ffworker.outputs import OutputExists
from tests.helpers import ffmpeg_processes_touching, make_celery_current, wait_until
from tests.integration.test_hot_path import counting_wrapper, runs_of
from tests.integration.test_ledger import new_job
from tests.integration.test_webhooks import add_endpoint, deliveries

pytestmark = pytest.mark.integration


class TenantObjects:
    """A tenant's files in the test's bucket, through a client of the test's own."""

    def __init__(self, server, settings, tenant) -> None:
        self.s3 = server.client()
        self.bucket = s3.bucket(settings)
        self.tenant = tenant

    def key(self, path: str) -> str:
        return self.bucket.key(self.tenant.name, path)

    def put(self, path: str, data: bytes) -> None:
        self.s3.put_object(Bucket=self.bucket.name, Key=self.key(path), Body=data)

    def get(self, path: str) -> bytes:
        return self.s3.get_object(Bucket=self.bucket.name, Key=self.key(path))["Body"].read()

    def head(self, path: str) -> dict:
        return self.s3.head_object(Bucket=self.bucket.name, Key=self.key(path))

    def paths(self) -> set[str]:
        prefix = self.bucket.tenant_prefix(self.tenant.name)
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket.name, Prefix=prefix)
        return {item["Key"][len(prefix):] for page in pages for item in page.get("Contents", [])}

    def download(self, path: str, directory: Path) -> Path:
        local = directory / path
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(self.get(path))
        return local


@pytest.fixture
def objects(s3_server, s3_settings, tenant) -> TenantObjects:
    return TenantObjects(s3_server, s3_settings, tenant)


@pytest.fixture
def clip_bytes(make_clip, tmp_path):
    """clip_bytes(**params): a generated clip's bytes."""
    def make(**params) -> bytes:
        return make_clip(tmp_path / "clip.mp4", **params).read_bytes()
    return make


def scratch_left(job_id) -> list[Path]:
    return list(Path(tempfile.gettempdir()).glob(f"ffworker-{job_id}.*"))


def run(ledger, settings, tenant, kind: str, spec: dict, **overrides) -> dict:
    job = new_job(ledger, tenant, kind=kind, spec=spec, **overrides)
    worker.run(job["id"], ledger, settings)
    return ledger.get(job["id"])


def untouched(tenant) -> bool:
    """The local media directory (create_tenant makes it) holds nothing."""
    return not tenant.media.exists() or not any(tenant.media.iterdir())


# -- kinds ----------------------------------------------------------------------------------


def test_transcode_thumbnail_and_concat_read_and_write_the_bucket(
        ledger, s3_settings, tenant, objects, clip_bytes, tmp_path):
    objects.put("in/a.mp4", clip_bytes(seconds=1))
    objects.put("in/b.mp4", clip_bytes(seconds=1, size="160x120"))

    transcoded = run(ledger, s3_settings, tenant, "transcode",
                     {"input": "in/a.mp4", "output": "out/small.mp4", "video": {"codec": "h264", "height": 120}})
    thumbnail = run(ledger, s3_settings, tenant, "thumbnail", {"input": "in/a.mp4", "output": "out/a.jpg"})
    merged = run(ledger, s3_settings, tenant, "concat",
                 {"inputs": ["in/a.mp4", "in/b.mp4", "in/a.mp4"], "output": "out/merged.mp4", "mode": "reencode"})

    for row in (transcoded, thumbnail, merged):
        assert row["status"] == "completed", row["error_message"]
        assert scratch_left(row["id"]) == []
    assert objects.paths() == {"in/a.mp4", "in/b.mp4", "out/small.mp4", "out/a.jpg", "out/merged.mp4"}
    small = process.ffprobe(str(objects.download("out/small.mp4", tmp_path)), timeout_s=10)
    assert small["streams"][0]["height"] == 120
    assert transcoded["result"]["outputs"][0]["size_bytes"] == objects.head("out/small.mp4")["ContentLength"]
    assert objects.head("out/small.mp4")["ContentType"] == "video/mp4"
    picture = process.ffprobe(str(objects.download("out/a.jpg", tmp_path)), timeout_s=10, formats="image2")
    assert picture["streams"][0]["width"] == 320
    joined = process.ffprobe(str(objects.download("out/merged.mp4", tmp_path)), timeout_s=10)
    assert float(joined["format"]["duration"]) == pytest.approx(3.0, abs=0.2)
    assert merged["result"]["mode"] == "reencode"
    assert untouched(tenant)


def test_an_hls_ladder_goes_up_master_last_and_replacing_it_drops_what_it_no_longer_has(
        ledger, s3_settings, tenant, objects, clip_bytes, tmp_path):
    objects.put("in.mp4", clip_bytes(seconds=2))
    written = []

    def record(params, **_):
        written.append(params["Key"].rsplit("/", 1)[-1])

    clients = (s3.client(), s3.no_replace_client())
    for client in clients:
        client.meta.events.register("before-parameter-build.s3.PutObject", record)
    try:
        first = run(ledger, s3_settings, tenant, "hls",
                    {"input": "in.mp4", "output_dir": "ladder", "renditions": [144, 240], "segment_s": 1})
        assert first["status"] == "completed", first["error_message"]
        assert written[-1] == "master.m3u8" and len(written) > 2
        before = objects.paths()

        written.clear()
        second = run(ledger, s3_settings, tenant, "hls",
                     {"input": "in.mp4", "output_dir": "ladder", "renditions": [144], "segment_s": 1,
                      "overwrite": True})
    finally:
        for client in clients:
            client.meta.events.unregister("before-parameter-build.s3.PutObject", record)

    assert second["status"] == "completed", second["error_message"]
    assert written[-1] == "master.m3u8"
    assert {p for p in before if p.startswith("ladder/240p")}, before
    after = objects.paths()
    assert not {p for p in after if p.startswith("ladder/240p")}
    assert {p for p in after if p.startswith("ladder/144p")} == {p for p in before if p.startswith("ladder/144p")}
    assert objects.head("ladder/master.m3u8")["ContentType"] == "application/vnd.apple.mpegurl"
    for path in after:
        objects.download(path, tmp_path)
    ladder = process.ffprobe(str(tmp_path / "ladder/master.m3u8"), timeout_s=10, formats="hls,mpegts")
    assert [s["height"] for s in ladder["streams"] if s["codec_type"] == "video"] == [144]
    assert second["result"]["outputs"][0]["path"] == "ladder/master.m3u8"
    assert scratch_left(first["id"]) == scratch_left(second["id"]) == []


# -- refusals and failures ------------------------------------------------------------------


def test_a_missing_input_fails_as_a_missing_file_does(ledger, s3_settings, tenant, objects):
    row = run(ledger, s3_settings, tenant, "probe", {"input": "nowhere.mp4"})

    assert (row["status"], row["error_code"]) == ("failed", "invalid_request")
    assert row["error_message"] == "input 'nowhere.mp4' does not exist"
    assert scratch_left(row["id"]) == []


def test_a_missing_bucket_is_not_taken_for_a_missing_input(ledger, s3_settings, tenant):
    row = run(ledger, s3_settings.with_overrides(storage_url="s3://no-such-bucket-here/media"), tenant,
              "probe", {"input": "in.mp4"})

    assert (row["status"], row["error_code"]) == ("failed", "input_unavailable")
    assert "bucket does not exist" in row["error_message"]


def test_inputs_past_the_scratch_allowance_fail_at_once(ledger, s3_settings, tenant, objects, clip_bytes):
    clip = clip_bytes(seconds=1)
    objects.put("a.mp4", clip)
    objects.put("b.mp4", clip)
    allowance = s3_settings.with_overrides(scratch_max_bytes=len(clip) + 1)

    row = run(ledger, allowance, tenant, "concat", {"inputs": ["a.mp4", "b.mp4"], "output": "ab.mp4"})

    assert (row["status"], row["error_code"], row["attempts"]) == ("failed", "input_unavailable", 1)
    assert row["error_message"].startswith("input 'b.mp4' is too large")
    assert scratch_left(row["id"]) == []
    assert objects.paths() == {"a.mp4", "b.mp4"}


def test_an_existing_output_is_refused_before_anything_is_encoded(ledger, s3_settings, tenant, objects, clip_bytes):
    objects.put("in.mp4", clip_bytes(seconds=1))
    objects.put("out.mp4", b"not ours")

    row = run(ledger, s3_settings, tenant, "transcode", {"input": "in.mp4", "output": "out.mp4"})

    assert (row["status"], row["error_code"]) == ("failed", "invalid_request")
    assert "already exists" in row["error_message"]
    assert objects.get("out.mp4") == b"not ours"


def take_the_job_away(engine, job_id) -> None:
    """What a reap and another worker's claim do to this run: its fencing token is stale."""
    with engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET attempts = attempts + 1 WHERE id = :id"), {"id": job_id})


@pytest.mark.parametrize("stop, outcome", [("cancel", "cancelled"), ("fence", "lost")])
def test_a_run_stopped_during_the_encode_leaves_no_object_and_no_scratch(
        ledger, engine, s3_settings, tenant, objects, clip_bytes, stop, outcome):
    objects.put("in.mp4", clip_bytes(seconds=10, size="640x360"))
    job = new_job(ledger, tenant, kind="transcode",
                  spec={"input": "in.mp4", "output": "out.mp4", "video": {"codec": "h264", "preset": "slow"}})
    reports = []
    runner = threading.Thread(target=lambda: reports.append(worker.run(job["id"], ledger, s3_settings)))
    runner.start()
    wait_until(lambda: ffmpeg_processes_touching(f"{job['id']}.1."), 30)
    assert scratch_left(job["id"])
    if stop == "cancel":
        ledger.request_cancel(job["id"], tenant.id)
    else:
        take_the_job_away(engine, job["id"])
    runner.join(30)

    assert [r.outcome for r in reports] == [outcome]
    assert scratch_left(job["id"]) == []
    assert objects.paths() == {"in.mp4"}


# -- the upload ------------------------------------------------------------------------------


def placed_files(stage: staging.Stage, names: list[str]) -> list[Output]:
    placed = []
    for name in names:
        final = stage.root / name
        final.write_bytes(name.encode() * 1000)
        placed.append(Output(name, final, final))
    return placed


def test_an_object_that_appeared_meanwhile_is_not_replaced_and_the_upload_is_taken_back(
        s3_settings, tenant, objects):
    stage = staging.Stage(s3_settings, tenant.name, "job-upload", 1)
    try:
        placed = placed_files(stage, ["a.mp4", "b.mp4", "c.mp4"])
        objects.put("b.mp4", b"someone else's")

        with pytest.raises(OutputExists, match="'b.mp4' appeared while the job ran"):
            stage.upload(placed, overwrite=False, stop=threading.Event(), deadline=time.monotonic() + 30)
        assert objects.paths() == {"b.mp4"}
        assert objects.get("b.mp4") == b"someone else's"

        # With overwrite (or over the job's own earlier objects) it is replaced.
        stage.upload(placed, overwrite=True, stop=threading.Event(), deadline=time.monotonic() + 30)
        assert objects.get("b.mp4") == b"b.mp4" * 1000
        assert objects.paths() == {"a.mp4", "b.mp4", "c.mp4"}
    finally:
        stage.remove()
    assert not stage.dir.exists()


def test_a_write_cancelled_in_flight_is_taken_back_only_when_it_is_this_runs(s3_settings, tenant, objects):
    # A transfer cancelled while its request was on the wire reports itself cancelled although
    # the bucket may have stored the object (seen: about one upload in six when a sibling's
    # write failed). Such keys are deleted when the object carries this run's mark, never
    # when it is someone else's.
    stage = staging.Stage(s3_settings, tenant.name, "job-unsure", 1)
    mark = {staging.RUN_METADATA: stage.run}
    try:
        objects.s3.put_object(Bucket=objects.bucket.name, Key=objects.key("ours.mp4"), Body=b"x", Metadata=mark)
        objects.s3.put_object(Bucket=objects.bucket.name, Key=objects.key("earlier-attempt.mp4"), Body=b"x",
                              Metadata={staging.RUN_METADATA: "job-unsure.0"})
        objects.put("theirs.mp4", b"someone else's")
        keys = [objects.key(name) for name in ("ours.mp4", "earlier-attempt.mp4", "theirs.mp4", "never-sent.mp4")]

        stage._take_back(written=[], attempted=keys)

        assert objects.paths() == {"earlier-attempt.mp4", "theirs.mp4"}
    finally:
        stage.remove()


def test_a_stopped_upload_writes_nothing(s3_settings, tenant, objects):
    stage = staging.Stage(s3_settings, tenant.name, "job-stopped", 1)
    stop = threading.Event()
    stop.set()
    try:
        with pytest.raises(staging.TransferStopped):
            stage.upload(placed_files(stage, ["a.mp4"]), overwrite=False, stop=stop, deadline=time.monotonic() + 30)
    finally:
        stage.remove()
    assert objects.paths() == set()


# -- presigned URLs ------------------------------------------------------------------------


@pytest.fixture
def s3_app(app, s3_settings):
    """Apps of the test's own in object-storage mode; afterwards the session's app is Celery's
    current one again (a task run in a later test must not find this test's settings)."""
    from ffworker.app import create_app

    apps = []

    def make(**overrides):
        app = create_app({"TESTING": True, "FFWORKER_SETTINGS": s3_settings.with_overrides(**overrides)})
        apps.append(app)
        return app.test_client()

    yield make
    for own in apps:
        own.extensions["ffworker_events"].hub.close()
    make_celery_current(app)


def test_a_completed_jobs_outputs_have_fresh_presigned_urls(
        ledger, engine, s3_server, s3_settings, tenant, objects, clip_bytes, s3_app, receiver):
    objects.put("in.mp4", clip_bytes(seconds=1))
    add_endpoint(s3_app(allow_private_urls=True), tenant, receiver.url(), ["job.completed"])
    row = run(ledger, s3_settings, tenant, "thumbnail", {"input": "in.mp4", "output": "thumb.png"})
    assert row["status"] == "completed", row["error_message"]
    assert "url" not in row["result"]["outputs"][0]  # made when the job is read, never stored

    shown = s3_app().get(f"/v1/jobs/{row['id']}", headers=tenant.headers).get_json()
    url = shown["result"]["outputs"][0]["url"]
    assert urlsplit(url).netloc == urlsplit(s3_server.endpoint).netloc
    fetched = requests.get(url, timeout=10)
    assert fetched.status_code == 200 and fetched.content == objects.get("thumb.png")
    assert fetched.headers["Content-Type"] == "image/png"
    assert requests.get(url.split("?", 1)[0], timeout=10).status_code == 403  # unsigned: refused

    public = f"http://localhost:{urlsplit(s3_server.endpoint).port}"
    listed = s3_app(storage_public_url=public).get("/v1/jobs", headers=tenant.headers).get_json()
    public_url = listed["jobs"][0]["result"]["outputs"][0]["url"]
    assert public_url.startswith(f"{public}/") and "X-Amz-Expires=3600" in public_url
    assert requests.get(public_url, timeout=10).content == fetched.content

    # The webhook's body shows the job as GET does: with a URL made for the delivery attempt.
    (pending,) = deliveries(engine, event="job.completed")
    assert delivery.send(engine, pending["id"], allow_private=True, settings=s3_settings) == "success"
    (received,) = receiver.wait_for(1)
    hooked = received.json["data"]["result"]["outputs"][0]["url"]
    assert requests.get(hooked, timeout=10).content == fetched.content


# -- the probe cache -------------------------------------------------------------------------


def test_an_object_probed_once_is_not_probed_again_until_it_changes(
        ledger, s3_settings, tenant, objects, clip_bytes, tmp_path, monkeypatch):
    objects.put("in.mp4", clip_bytes(seconds=1))
    binary, log = counting_wrapper(tmp_path, "ffprobe", keep_stdout=False)
    monkeypatch.setattr(process, "FFPROBE", binary)

    # A Matroska output is described by ffprobe (an MP4 one from its header, with no probe to keep).
    spec = {"input": "in.mp4", "output": "out/small.mkv", "video": {"codec": "h264", "height": 120}}
    assert run(ledger, s3_settings, tenant, "transcode", spec)["status"] == "completed"
    assert runs_of(log) == 2  # the input, then the output
    for path in ("in.mp4", "out/small.mkv"):  # the input as downloaded, the output as uploaded
        assert run(ledger, s3_settings, tenant, "probe", {"input": path})["status"] == "completed"
    assert runs_of(log) == 2

    objects.put("in.mp4", clip_bytes(seconds=1, size="160x120"))
    probed = run(ledger, s3_settings, tenant, "probe", {"input": "in.mp4"})

    assert runs_of(log) == 3
    assert probed["result"]["media"]["streams"][0]["width"] == 160
