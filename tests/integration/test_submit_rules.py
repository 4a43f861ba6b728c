"""Submit-time refusals of outputs the run could only fail on, on both media stores, and the
answer after commit.

Real PostgreSQL, broker and S3 server; no worker runs, so submitted jobs stay queued.
"""
from __future__ import annotations

import pytest
from sqlalchemy import text

from ffworker import paths, s3
from ffworker.kinds import command
from tests.helpers import make_celery_current
from tests.integration.test_api import assert_error, error_fields, job_count, submit

pytestmark = pytest.mark.integration

# NAME_MAX 255 − ".ffwtmp." − a job uuid − "." − a 6-digit attempt − "." − a 16-byte scratch suffix
LIMIT = 255 - 8 - 36 - 1 - 6 - 1 - 16
LONG = "a" * (LIMIT + 1 - 4) + ".mp4"     # one byte over the rule
LONGEST = "a" * (LIMIT - 4) + ".mp4"      # exactly at it


@pytest.fixture
def media(tenant, make_clip):
    make_clip(tenant.media / "in.mp4")
    make_clip(tenant.media / "b.mp4")
    return tenant.media


@pytest.fixture
def raw_commands(app, monkeypatch):
    services = app.extensions["ffworker"]
    monkeypatch.setattr(services, "settings", services.settings.with_overrides(allow_raw_commands=True))


@pytest.mark.parametrize("body, field", [
    ({"kind": "transcode", "input": "in.mp4", "output": f"out/{LONG}", "preset": "h264-360p"}, "output"),
    ({"kind": "thumbnail", "input": "in.mp4", "output": LONG.replace(".mp4", ".jpg")}, "output"),
    ({"kind": "concat", "inputs": ["in.mp4", "b.mp4"], "output": LONG}, "output"),
    ({"kind": "hls", "input": "in.mp4", "output_dir": LONG}, "output_dir"),
])
def test_an_output_name_without_room_for_its_in_flight_name_is_422(client, tenant, media, engine, settings,
                                                                    body, field):
    response = submit(client, tenant, body)
    assert field in error_fields(assert_error(response, settings, 422))
    assert job_count(engine, tenant) == 0


def test_a_raw_command_output_without_room_for_its_in_flight_name_is_422(
        client, tenant, media, engine, settings, raw_commands):
    response = submit(client, tenant, {"kind": "command", "args": ["-i", "in.mp4", LONG]})
    assert "args" in error_fields(assert_error(response, settings, 422))
    assert job_count(engine, tenant) == 0


def test_the_longest_allowed_output_name_is_accepted(client, tenant, media, purge_queue):
    assert paths.MAX_OUTPUT_NAME_BYTES == LIMIT
    response = submit(client, tenant, {"kind": "transcode", "input": "in.mp4", "output": LONGEST,
                                       "preset": "h264-360p"})
    assert response.status_code == 202, response.get_data(as_text=True)


@pytest.mark.parametrize("body, field", [
    ({"kind": "transcode", "input": "in.mp4", "output": "in.mp4/out.mp4", "preset": "h264-360p"}, "output"),
    ({"kind": "concat", "inputs": ["in.mp4", "b.mp4"], "output": "b.mp4/sub/out.mp4"}, "output"),
    ({"kind": "hls", "input": "in.mp4", "output_dir": "in.mp4/ladder"}, "output_dir"),
])
def test_an_output_below_an_existing_file_is_422(client, tenant, media, engine, settings, body, field):
    response = submit(client, tenant, body)
    error = assert_error(response, settings, 422)
    assert field in error_fields(error)
    assert "is a file, not a directory" in str(error["errors"])
    assert job_count(engine, tenant) == 0


# -- after the commit and the publish, the answer is 202 --------------------------------


def test_a_submission_is_published_without_a_write_after_its_commit(
        app, client, tenant, media, engine, settings, purge_queue):
    """The submission's row counts its first publish (one write per job fewer): the message is
    on the queue and the row says published, and nothing updated the row after the insert."""
    response = submit(client, tenant, {"kind": "probe", "input": "in.mp4"})

    assert response.status_code == 202, response.get_data(as_text=True)
    job = response.get_json()
    with engine.connect() as conn:
        row = conn.execute(text("SELECT dispatched_at, dispatch_count, xmin::text = (SELECT xmin::text FROM "
                                "job_events WHERE job_id = jobs.id) AS untouched FROM jobs WHERE id = :id"),
                           {"id": job["id"]}).one()
    assert row.dispatched_at is not None and row.dispatch_count == 1
    assert row.untouched  # the row is still the version its submission's statement wrote
    celery = app.extensions["celery"]
    with celery.connection_for_read() as conn:
        message = conn.default_channel.basic_get(settings.task_queue, no_ack=True)
    assert message is not None
    assert message.headers["id"] and job["id"] in str(message.headers.get("argsrepr"))


# -- on object storage: the same rules, asked of the bucket ------------------------------

# One state on both stores: files, a directory, a previous HLS ladder, a directory that is not one.
STORED = ["in.mp4", "b.mp4", "out.mp4", "dir/x.mp4", "clips.mp4/a.mp4", "ladder/master.m3u8", "ladder/360p.m3u8", "other/x.txt"]
TRANSCODE = {"kind": "transcode", "input": "in.mp4", "output": "new/out.mp4", "preset": "h264-360p"}
HLS = {"kind": "hls", "input": "in.mp4", "output_dir": "new-ladder"}


@pytest.fixture
def bucket_app(app, s3_settings):
    from ffworker.app import create_app

    bucket_app = create_app({"TESTING": True, "FFWORKER_SETTINGS": s3_settings.with_overrides(allow_raw_commands=True)})
    yield bucket_app
    bucket_app.extensions["ffworker_events"].hub.close()
    make_celery_current(app)


@pytest.fixture
def both_stores(bucket_app, s3_settings, tenant):
    """STORED on the tenant's directory and in its bucket prefix; the two apps' clients."""
    bucket = s3.bucket(s3_settings)
    for name in STORED:
        (tenant.media / name).parent.mkdir(parents=True, exist_ok=True)
        (tenant.media / name).write_bytes(b"x")
        s3.client().put_object(Bucket=bucket.name, Key=bucket.key(tenant.name, name), Body=b"x")
    return bucket_app.test_client()


@pytest.mark.parametrize("body", [
    {**TRANSCODE, "input": "missing.mp4"},
    {**TRANSCODE, "input": "dir"},
    {**TRANSCODE, "output": "out.mp4"},
    {**TRANSCODE, "output": "clips.mp4"},
    {**TRANSCODE, "output": "in.mp4/out.mp4"},
    {**TRANSCODE, "output": "./in.mp4", "overwrite": True},
    {**TRANSCODE, "output": f"out/{LONG}"},
    {"kind": "concat", "inputs": ["in.mp4", "b.mp4"], "output": "b.mp4", "overwrite": True},
    {**HLS, "output_dir": "ladder"},
    {**HLS, "output_dir": "other", "overwrite": True},
    {**HLS, "input": "dir/x.mp4", "output_dir": "dir", "overwrite": True},
    {**HLS, "output_dir": "out.mp4"},
    {"kind": "thumbnail", "input": "missing.mp4", "output": "b.mp4"},
], ids=lambda body: "-".join(str(v) for k, v in body.items() if k != "preset")[:60])
def test_on_object_storage_a_submit_is_refused_exactly_as_locally(client, both_stores, tenant, engine, settings,
                                                                   body):
    local = assert_error(submit(client, tenant, body), settings, 422)
    on_bucket = assert_error(submit(both_stores, tenant, body), settings, 422)
    assert on_bucket == local
    assert job_count(engine, tenant) == 0


@pytest.mark.parametrize("body", [
    TRANSCODE,
    {**TRANSCODE, "output": "out.mp4", "overwrite": True},
    {**HLS, "output_dir": "ladder", "overwrite": True},
], ids=["new-output", "overwrite", "replace-ladder"])
def test_on_object_storage_what_is_accepted_locally_is_accepted(client, both_stores, tenant, purge_queue, body):
    assert submit(client, tenant, body).status_code == 202
    assert submit(both_stores, tenant, body).status_code == 202


def test_on_object_storage_the_command_kind_is_refused(both_stores, tenant, engine, settings):
    response = submit(both_stores, tenant, {"kind": "command", "args": ["-i", "in.mp4", "c.mp4"]})
    error = assert_error(response, settings, 422)
    assert error["errors"] == {"kind": [command.OBJECT_STORAGE_MESSAGE]}
    assert job_count(engine, tenant) == 0
