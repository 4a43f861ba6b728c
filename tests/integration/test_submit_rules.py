"""Submit-time refusals of outputs the run could only fail on, and the answer after commit.

Real PostgreSQL and broker; no worker runs, so submitted jobs stay queued.
"""
from __future__ import annotations

import pytest
from sqlalchemy import text

from ffworker import paths
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
