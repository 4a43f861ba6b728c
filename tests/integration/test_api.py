"""The ``/v1`` REST API against a real PostgreSQL ledger and a real Redis broker.

No worker runs here: submitted jobs stay queued, which is exactly what lets
these tests look at the row, its audit events and the published message.
"""
from __future__ import annotations

import base64
import json
import os
import threading
import uuid

import pytest
from sqlalchemy import text

from ffworker import tenants as ffwtenants
from tests.helpers import field_names

pytestmark = pytest.mark.integration

RANDOM_ID = "5f0c1d9e-8a43-4a7e-9a57-0c2b3e4d5f60"


# -- helpers -------------------------------------------------------------------


def assert_error(response, settings, status: int) -> dict:
    """An error response: the given status, JSON with a ``message``, and nothing server-side in it."""
    raw = response.get_data(as_text=True)
    assert response.status_code == status, raw
    assert response.mimetype == "application/json", raw
    body = response.get_json()
    assert isinstance(body, dict), raw
    assert isinstance(body.get("message"), str) and body["message"].strip(), raw
    for secret in {str(settings.media_root), os.path.realpath(settings.media_root)}:
        assert secret not in raw, f"server path leaked: {raw}"
    for marker in ("Traceback", 'File "', "SELECT", "INSERT", "UPDATE jobs", "psycopg", "sqlalchemy"):
        assert marker not in raw, f"{marker!r} leaked: {raw}"
    return body


def error_fields(body: dict) -> set[str]:
    """Dotted names of every field the error body names."""
    return field_names(body.get("errors") or {})


def job_count(engine, tenant=None) -> int:
    query = "SELECT count(*) FROM jobs" + (" WHERE tenant_id = :t" if tenant else "")
    with engine.connect() as conn:
        return conn.execute(text(query), {"t": tenant.id} if tenant else {}).scalar_one()


def ledger_of(client):
    return client.application.extensions["ffworker"].ledger


def transitions(ledger, job_id) -> list[tuple]:
    return [(e["from_status"], e["to_status"]) for e in ledger.events(uuid.UUID(str(job_id)))]


def queued_job_ids(app, settings) -> list[str]:
    """Job ids of the ``run_job`` messages waiting on this run's Redis queue."""
    celery = app.extensions["celery"]
    ids = []
    with celery.connection_for_write() as conn:
        for raw in conn.default_channel.client.lrange(settings.task_queue, 0, -1):
            message = json.loads(raw)
            assert message["headers"]["task"] == "ffworker.run_job"
            args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
            assert kwargs == {}
            ids.extend(args)
    return ids


def check_each(cases, check) -> None:
    """Run ``check(case)`` for every (label, case); report every failing label at once."""
    failures = []
    for label, case in cases:
        try:
            check(case)
        except AssertionError as exc:
            failures.append(f"{label}: {exc}")
    assert not failures, "\n".join(failures)


def b64(payload) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


@pytest.fixture
def media(tenant, make_clip, tmp_path):
    """The tenant's media: a clip, directories, and symlinks inside and out of the media root."""
    make_clip(tenant.media / "in.mp4")
    (tenant.media / "subdir").mkdir()
    (tenant.media / "subdir.mp4").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.mp4").write_bytes(b"not yours")
    os.symlink(outside / "secret.mp4", tenant.media / "escape.mp4")
    os.symlink(outside, tenant.media / "escape_dir")
    os.symlink("in.mp4", tenant.media / "alias.mp4")
    return tenant.media


def submit(client, tenant, body, **headers):
    return client.post("/v1/jobs", json=body, headers={**tenant.headers, **headers})


PROBE = {"kind": "probe", "input": "in.mp4"}


# -- authentication and the public endpoints --------------------------------------


BAD_AUTH = {
    "no header": lambda key: {},
    "empty header": lambda key: {"Authorization": ""},
    "basic scheme": lambda key: {"Authorization": f"Basic {key}"},
    "token scheme": lambda key: {"Authorization": f"Token {key}"},
    "key without scheme": lambda key: {"Authorization": key},
    "bearer without key": lambda key: {"Authorization": "Bearer "},
    "unknown key": lambda key: {"Authorization": "Bearer ffw_" + "A" * 43},
    "key with a flipped char": lambda key: {"Authorization": f"Bearer {key[:-1]}{'B' if key[-1] != 'B' else 'C'}"},
}


def test_calls_without_a_valid_key_are_401(client, tenant, media, engine, settings, purge_queue):
    endpoints = [
        ("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", f"/v1/jobs/{RANDOM_ID}"),
        ("POST", f"/v1/jobs/{RANDOM_ID}/cancel"), ("DELETE", f"/v1/jobs/{RANDOM_ID}"),
    ]
    # A real job exists, so a 401 cannot be a 404 in disguise.
    job_id = submit(client, tenant, PROBE).get_json()["id"]
    endpoints += [("GET", f"/v1/jobs/{job_id}"), ("POST", f"/v1/jobs/{job_id}/cancel"), ("DELETE", f"/v1/jobs/{job_id}")]

    def check(case):
        name, (method, path) = case
        response = client.open(path, method=method, json=PROBE if method == "POST" else None,
                               headers=BAD_AUTH[name](tenant.key))
        assert_error(response, settings, 401)

    check_each([(f"{name} {m} {p}", (name, (m, p))) for name in BAD_AUTH for m, p in endpoints], check)
    assert job_count(engine) == 1
    assert transitions(ledger_of(client), job_id) == [(None, "queued")]


def test_a_revoked_key_is_401_and_other_keys_keep_working(client, tenant, engine, settings):
    second = ffwtenants.issue_key(engine, tenant.name)
    assert client.get("/v1/jobs", headers=tenant.headers).status_code == 200
    # The scheme is case-insensitive (RFC 9110); the key is not.
    assert client.get("/v1/jobs", headers={"Authorization": f"bearer {tenant.key}"}).status_code == 200
    assert_error(client.get("/v1/jobs", headers={"Authorization": f"Bearer {tenant.key.swapcase()}"}), settings, 401)
    assert ffwtenants.revoke_key(engine, tenant.key) == 1
    assert_error(client.get("/v1/jobs", headers=tenant.headers), settings, 401)
    assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {second}"}).status_code == 200


def test_public_endpoints_need_no_key(app):
    client = app.test_client()
    for path in ("/health", "/ready", "/openapi.json"):
        response = client.get(path)
        assert response.status_code == 200, path
        assert response.mimetype == "application/json", path
    assert client.get("/ready").get_json()["status"] == "ok"


def test_openapi_document(app):
    doc = app.test_client().get("/openapi.json").get_json()
    assert str(doc["openapi"]).startswith("3")
    assert doc["info"]["title"] and doc["info"]["version"]
    paths = doc["paths"]
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel"} <= set(paths)
    assert {"get", "post"} <= set(paths["/v1/jobs"])
    assert {"get", "delete"} <= set(paths["/v1/jobs/{job_id}"])
    assert "202" in paths["/v1/jobs"]["post"]["responses"]
    assert "requestBody" in paths["/v1/jobs"]["post"]
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {"type": "http", "scheme": "bearer"}
    assert {"bearerAuth": []} in doc["security"]
    for path, operations in paths.items():
        for method, operation in operations.items():
            if method in ("get", "post", "delete", "put", "patch"):
                assert operation.get("responses"), f"{method} {path} documents no responses"

    # Every reference resolves inside the document.
    def refs(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "$ref":
                    yield value
                else:
                    yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    found = list(refs(doc))
    assert found, "the document references no schemas"
    for ref in found:
        assert ref.startswith("#/"), ref
        target = doc
        for part in ref[2:].split("/"):
            assert part in target, f"dangling reference {ref}"
            target = target[part]


# -- submission --------------------------------------------------------------------


SUBMISSIONS = {
    "probe": (
        {"kind": "probe", "input": "in.mp4"},
        {"input": "in.mp4", "overwrite": False},
    ),
    "transcode preset": (
        {"kind": "transcode", "input": "in.mp4", "output": "out/360.mp4", "preset": "h264-360p"},
        {"input": "in.mp4", "output": "out/360.mp4", "preset": "h264-360p", "overwrite": False},
    ),
    "transcode explicit": (
        {"kind": "transcode", "input": "in.mp4", "output": "small.mkv",
         "video": {"codec": "hevc", "crf": 28, "preset": "fast", "quality": "480p", "fps": 24},
         "audio": {"codec": "opus", "bitrate": "96k"}},
        {"input": "in.mp4", "output": "small.mkv",
         "video": {"codec": "hevc", "crf": 28, "preset": "fast", "quality": "480p", "fps": 24.0},
         "audio": {"codec": "opus", "bitrate": "96k"}, "overwrite": False},
    ),
    "transcode explicit defaults": (
        {"kind": "transcode", "input": "in.mp4", "output": "h.mp4", "video": {"height": 240}, "audio": {}},
        {"input": "in.mp4", "output": "h.mp4", "video": {"codec": "h264", "height": 240},
         "audio": {"codec": "aac"}, "overwrite": False},
    ),
    "thumbnail": (
        {"kind": "thumbnail", "input": "in.mp4", "output": "thumbs/a.jpg", "at_s": 0.5, "width": 160},
        {"input": "in.mp4", "output": "thumbs/a.jpg", "at_s": 0.5, "width": 160, "overwrite": False},
    ),
}


def test_submit_stores_dispatches_and_answers_202(app, client, tenant, media, ledger, settings, purge_queue):
    check_each(sorted(SUBMISSIONS.items()),
               lambda case: check_submission(app, client, tenant, ledger, settings, *case))
    assert len(queued_job_ids(app, settings)) == len(SUBMISSIONS)


def check_submission(app, client, tenant, ledger, settings, body, expected_spec):
    metadata = {"upload": 1234, "tags": ["a", "ü"], "nested": {"ok": True, "none": None}}
    body = {**body, "workspace": "campaign-7", "priority": 5, "metadata": metadata}
    response = submit(client, tenant, body)

    assert response.status_code == 202, response.get_data(as_text=True)
    job = response.get_json()
    job_id = job["id"]
    assert str(uuid.UUID(job_id)) == job_id
    assert response.headers["Location"] == f"/v1/jobs/{job_id}"
    assert job["status"] == "queued" and job["kind"] == body["kind"]
    assert job["spec"] == expected_spec
    assert job["workspace"] == "campaign-7" and job["priority"] == 5 and job["metadata"] == metadata
    assert job["progress"] is None and job["result"] is None and job["error"] is None
    assert job["attempts"] == 0 and job["max_attempts"] == settings.max_attempts
    assert job["started_at"] is None and job["finished_at"] is None and job["created_at"]
    assert not {"stderr_tail", "worker", "tenant_id", "idempotency_key", "request_sha256"} & set(job)

    row = ledger.get(uuid.UUID(job_id), tenant_id=tenant.id)
    assert row is not None and row["status"] == "queued" and row["kind"] == body["kind"]
    assert row["spec"] == expected_spec and row["metadata"] == metadata
    assert row["workspace"] == "campaign-7" and row["priority"] == 5
    assert row["dispatched_at"] is not None and row["dispatch_count"] == 1
    assert transitions(ledger, job_id) == [(None, "queued")]
    assert queued_job_ids(app, settings).count(job_id) == 1

    fetched = client.get(response.headers["Location"], headers=tenant.headers)
    assert fetched.status_code == 200 and fetched.get_json() == job


def test_common_field_defaults_and_limits(client, tenant, media, ledger, settings, purge_queue):
    job = submit(client, tenant, PROBE).get_json()
    assert job["workspace"] == "default" and job["priority"] == 0 and job["metadata"] == {}
    assert job["timeout_s"] == settings.job_timeout_s

    overhead = len(json.dumps({"blob": ""}, separators=(",", ":")))
    metadata = {"blob": "x" * (16 * 1024 - overhead)}  # exactly 16 KiB
    response = submit(client, tenant, {**PROBE, "metadata": metadata})
    assert response.status_code == 202
    assert response.get_json()["metadata"] == metadata

    for priority in (-100, 100):
        assert submit(client, tenant, {**PROBE, "priority": priority}).get_json()["priority"] == priority


def test_timeout_is_capped_by_the_setting(client, tenant, media, ledger, settings, purge_queue):
    cap = settings.job_timeout_s
    below = max(1, cap // 2)
    for asked, expected in ((cap + 1000, cap), (10**12, cap), (below, below), (None, cap)):
        body = dict(PROBE) if asked is None else {**PROBE, "timeout_s": asked}
        response = submit(client, tenant, body)
        assert response.status_code == 202, response.get_data(as_text=True)
        assert response.get_json()["timeout_s"] == expected, asked
        assert ledger.get(uuid.UUID(response.get_json()["id"]))["timeout_s"] == expected, asked


# -- malformed and invalid bodies ---------------------------------------------------


def test_malformed_json_is_400(client, tenant, media, engine, settings):
    for raw in ('{"kind": "probe", "input": ', "{bad}", "{'kind': 'probe'}"):
        response = client.post("/v1/jobs", data=raw, content_type="application/json", headers=tenant.headers)
        assert_error(response, settings, 400)
    assert job_count(engine) == 0


def test_a_body_over_1_mib_is_413(client, tenant, media, engine, settings):
    raw = json.dumps({**PROBE, "metadata": {"blob": "x" * (1024 * 1024)}})
    response = client.post("/v1/jobs", data=raw, content_type="application/json", headers=tenant.headers)
    assert_error(response, settings, 413)
    assert job_count(engine) == 0


def test_a_body_that_is_not_an_object_is_rejected(client, tenant, media, engine, settings):
    def check(body):
        response = client.post("/v1/jobs", data=json.dumps(body), content_type="application/json",
                               headers=tenant.headers)
        assert response.status_code in (400, 422), response.status_code
        assert_error(response, settings, response.status_code)

    check_each([(repr(body), body) for body in ([], [PROBE], "probe", 42, None, True)], check)
    # JSON arrays and strings in particular are schema violations.
    for body in ([PROBE], "probe"):
        response = client.post("/v1/jobs", data=json.dumps(body), content_type="application/json",
                               headers=tenant.headers)
        assert_error(response, settings, 422)
    assert job_count(engine) == 0


INVALID_BODIES = {
    "no kind": ({"input": "in.mp4"}, "kind"),
    "unknown kind": ({"kind": "explode", "input": "in.mp4"}, "kind"),
    "kind not a string": ({"kind": ["probe"], "input": "in.mp4"}, "kind"),
    "unknown field": ({**PROBE, "shell": "rm -rf /"}, "shell"),
    "unknown nested field": (
        {"kind": "transcode", "input": "in.mp4", "output": "o.mp4", "video": {"codec": "h264", "filter": "x"}},
        "video.filter",
    ),
    "missing input": ({"kind": "probe"}, "input"),
    "missing output": ({"kind": "transcode", "input": "in.mp4", "preset": "h264-360p"}, "output"),
    "input not a string": ({"kind": "probe", "input": ["in.mp4"]}, "input"),
    "bad preset": ({"kind": "transcode", "input": "in.mp4", "output": "o.mp4", "preset": "h264-9000p"}, "preset"),
    "crf 52": ({"kind": "transcode", "input": "in.mp4", "output": "o.mp4", "video": {"crf": 52}}, "video.crf"),
    "crf -1": ({"kind": "transcode", "input": "in.mp4", "output": "o.mp4", "video": {"crf": -1}}, "video.crf"),
    "odd height": ({"kind": "transcode", "input": "in.mp4", "output": "o.mp4", "video": {"height": 721}}, "video.height"),
    "height and quality": (
        {"kind": "transcode", "input": "in.mp4", "output": "o.mp4", "video": {"height": 720, "quality": "720p"}},
        "video.quality",
    ),
    "unknown quality": ({"kind": "transcode", "input": "in.mp4", "output": "o.mp4", "video": {"quality": "4k"}}, "video.quality"),
    "unknown video codec": ({"kind": "transcode", "input": "in.mp4", "output": "o.mkv", "video": {"codec": "divx"}}, "video.codec"),
    "bad bitrate": ({"kind": "transcode", "input": "in.mp4", "output": "o.mp4", "audio": {"bitrate": "lots"}}, "audio.bitrate"),
    "webm with h264": ({"kind": "transcode", "input": "in.mp4", "output": "o.webm", "video": {"codec": "h264"}}, "video"),
    "webm with aac": (
        {"kind": "transcode", "input": "in.mp4", "output": "o.webm", "video": {"codec": "vp9"}, "audio": {"codec": "aac"}},
        "audio",
    ),
    "preset and video": (
        {"kind": "transcode", "input": "in.mp4", "output": "o.mp4", "preset": "h264-360p", "video": {"crf": 20}},
        "preset",
    ),
    "priority out of range": ({**PROBE, "priority": 1000}, "priority"),
    "priority not a number": ({**PROBE, "priority": "high"}, "priority"),
    "timeout zero": ({**PROBE, "timeout_s": 0}, "timeout_s"),
    "workspace with spaces": ({**PROBE, "workspace": "my workspace"}, "workspace"),
    "workspace too long": ({**PROBE, "workspace": "w" * 65}, "workspace"),
    "metadata not an object": ({**PROBE, "metadata": ["a"]}, "metadata"),
    "metadata over 16 KiB": ({**PROBE, "metadata": {"blob": "x" * (16 * 1024)}}, "metadata"),
    "overwrite not a boolean": ({**PROBE, "overwrite": "perhaps"}, "overwrite"),
    "negative at_s": ({"kind": "thumbnail", "input": "in.mp4", "output": "t.jpg", "at_s": -1}, "at_s"),
    "tiny thumbnail width": ({"kind": "thumbnail", "input": "in.mp4", "output": "t.jpg", "width": 2}, "width"),
}


def test_invalid_bodies_are_422_naming_the_field(client, tenant, media, engine, settings):
    def check(case):
        body, field = case
        error = assert_error(submit(client, tenant, body), settings, 422)
        assert field in error_fields(error), error

    check_each(sorted(INVALID_BODIES.items()), check)
    assert job_count(engine) == 0


def test_metadata_with_nan_is_rejected_as_a_client_error(client, tenant, media, engine, settings):
    raw = '{"kind": "probe", "input": "in.mp4", "metadata": {"ratio": NaN}}'
    response = client.post("/v1/jobs", data=raw, content_type="application/json", headers=tenant.headers)
    assert response.status_code in (400, 422), response.get_data(as_text=True)
    assert_error(response, settings, response.status_code)


def test_metadata_with_a_nul_character_is_422(client, tenant, media, engine, settings):
    def check(metadata):
        error = assert_error(submit(client, tenant, {**PROBE, "metadata": metadata}), settings, 422)
        assert "metadata" in error_fields(error)

    check_each([("in a value", {"note": "a\u0000b"}), ("in a key", {"a\u0000": "b"})], check)


# -- paths ---------------------------------------------------------------------------


HOSTILE_INPUTS = [
    "../in.mp4",
    "../../../../etc/passwd",
    "subdir/../../in.mp4",
    "subdir/../../../globex/in.mp4",
    "/etc/passwd",
    "//etc/passwd",
    "~/in.mp4",
    "concat:in.mp4|in.mp4",
    "http://example.com/x.mp4",
    "https://example.com/x.mp4",
    "file:in.mp4",
    "file:///etc/passwd",
    "pipe:0",
    "data:video/mp4;base64,AAAA",
    "C:in.mp4",
    "-i",
    "in.mp4\u0000.txt",
    "in\n.mp4",
    "escape.mp4",             # symlink to a file outside the media root
    "escape_dir/secret.mp4",  # symlinked directory outside the media root
    ".",
    "subdir",                 # a directory, not a file
    "",
]

HOSTILE_OUTPUTS = [
    "../out.mp4",
    "subdir/../../out.mp4",
    "/tmp/out.mp4",
    "//tmp/out.mp4",
    "~/out.mp4",
    "concat:a.mp4|b.mp4",
    "http://example.com/out.mp4",
    "file:out.mp4",
    "pipe:1.mp4",
    "-y.mp4",
    "out\r\n.mp4",
    "escape_dir/out.mp4",
    "escape.mp4",
    "subdir.mp4",             # an existing directory
    "out.ffwtmp.x.1.mp4",     # in-flight name marker
    "",
]


def test_hostile_input_paths_are_422(client, tenant, media, engine, settings):
    def check(body):
        error = assert_error(submit(client, tenant, body), settings, 422)
        assert "input" in error_fields(error), error
        assert "output" not in error_fields(error), error

    cases = []
    for path in HOSTILE_INPUTS:
        cases += [
            (f"probe {path!r}", {"kind": "probe", "input": path}),
            (f"transcode {path!r}", {"kind": "transcode", "input": path, "output": "ok.mp4", "preset": "h264-360p"}),
            (f"thumbnail {path!r}", {"kind": "thumbnail", "input": path, "output": "ok.jpg"}),
        ]
    check_each(cases, check)
    assert job_count(engine) == 0


def test_hostile_output_paths_are_422(client, tenant, media, engine, settings):
    def check(body):
        error = assert_error(submit(client, tenant, body), settings, 422)
        assert "output" in error_fields(error), error
        assert "input" not in error_fields(error), error

    cases = []
    for path in HOSTILE_OUTPUTS:
        for overwrite in (False, True):
            cases.append((f"{path!r} overwrite={overwrite}", {
                "kind": "transcode", "input": "in.mp4", "output": path, "preset": "h264-360p", "overwrite": overwrite,
            }))
        cases.append((f"thumbnail {path!r}", {"kind": "thumbnail", "input": "in.mp4", "output": path}))
    for output in ("t.mp4", "t", "t.jpg.sh"):  # thumbnails are images
        cases.append((f"thumbnail {output!r}", {"kind": "thumbnail", "input": "in.mp4", "output": output}))
    check_each(cases, check)
    assert job_count(engine) == 0


def test_a_missing_input_is_422(client, tenant, media, engine, settings, purge_queue):
    for path in ("nope.mp4", "subdir/nope.mp4", "in.mp4/x"):
        error = assert_error(submit(client, tenant, {"kind": "probe", "input": path}), settings, 422)
        assert "input" in error_fields(error)
    assert job_count(engine) == 0
    # A symlink that stays inside the media directory is an ordinary input.
    assert submit(client, tenant, {"kind": "probe", "input": "alias.mp4"}).status_code == 202


def test_an_existing_output_is_422_unless_overwrite(client, tenant, media, make_clip, engine, settings, purge_queue):
    make_clip(media / "done.mp4")
    body = {"kind": "transcode", "input": "in.mp4", "output": "done.mp4", "preset": "h264-360p"}
    error = assert_error(submit(client, tenant, body), settings, 422)
    assert "output" in error_fields(error)
    assert "overwrite" in error["message"]
    assert job_count(engine) == 0
    response = submit(client, tenant, {**body, "overwrite": True})
    assert response.status_code == 202
    assert response.get_json()["spec"]["overwrite"] is True


def test_the_output_must_not_be_the_input(client, tenant, media, engine, settings):
    def check(output):
        body = {"kind": "transcode", "input": "in.mp4", "output": output, "preset": "h264-360p", "overwrite": True}
        error = assert_error(submit(client, tenant, body), settings, 422)
        assert "output" in error_fields(error), error

    # The same file however it is spelled: verbatim, with a dot segment, through a symlink.
    check_each([(output, output) for output in ("in.mp4", "./in.mp4", "alias.mp4")], check)
    assert job_count(engine) == 0


def test_paths_name_files_of_the_callers_own_tenant(client, tenant, other_tenant, media, engine, settings):
    # in.mp4 exists for `tenant` only; `other_tenant` can neither see it nor reach it.
    for path in ("in.mp4", f"../{tenant.name}/in.mp4"):
        error = assert_error(submit(client, other_tenant, {"kind": "probe", "input": path}), settings, 422)
        assert "input" in error_fields(error)
    assert job_count(engine) == 0


# -- tenant isolation --------------------------------------------------------------------


def test_another_tenants_job_is_indistinguishable_from_a_missing_one(
    client, tenant, other_tenant, media, ledger, settings, purge_queue
):
    job_id = submit(client, tenant, PROBE).get_json()["id"]
    for method, suffix in (("GET", ""), ("POST", "/cancel"), ("DELETE", "")):
        theirs = client.open(f"/v1/jobs/{job_id}{suffix}", method=method, headers=other_tenant.headers)
        missing = client.open(f"/v1/jobs/{RANDOM_ID}{suffix}", method=method, headers=other_tenant.headers)
        assert_error(theirs, settings, 404)
        assert_error(missing, settings, 404)
        assert theirs.get_json() == missing.get_json()
        assert theirs.headers.get("Content-Length") == missing.headers.get("Content-Length")
    listing = client.get("/v1/jobs", headers=other_tenant.headers).get_json()
    assert listing == {"jobs": [], "next_cursor": None}
    for status in ("queued", "cancelled"):
        assert client.get("/v1/jobs", query_string={"status": status}, headers=other_tenant.headers).get_json()["jobs"] == []
    # The owner's job is untouched by the other tenant's cancel attempts.
    row = ledger.get(uuid.UUID(job_id))
    assert row["status"] == "queued" and row["cancel_requested_at"] is None
    assert transitions(ledger, job_id) == [(None, "queued")]
    assert client.get(f"/v1/jobs/{job_id}", headers=tenant.headers).status_code == 200

    # Ids that are not uuids are simply not found.
    for method, path in (("GET", "/v1/jobs/42"), ("DELETE", "/v1/jobs/x"), ("POST", "/v1/jobs/..%2F/cancel")):
        assert_error(client.open(path, method=method, headers=tenant.headers), settings, 404)


# -- listing -------------------------------------------------------------------------------


@pytest.fixture
def seven_jobs(client, tenant, media, ledger, purge_queue):
    """Seven jobs, oldest first, with kinds and workspaces mixed."""
    ids = []
    for n in range(7):
        if n % 3 == 2:
            body = {"kind": "thumbnail", "input": "in.mp4", "output": f"t{n}.jpg", "workspace": "thumbs"}
        else:
            body = {**PROBE, "workspace": "probes" if n % 2 else "default"}
        response = submit(client, tenant, body)
        assert response.status_code == 202
        ids.append(response.get_json()["id"])
    return ids


def list_ids(client, tenant, **params) -> list[str]:
    response = client.get("/v1/jobs", query_string=params, headers=tenant.headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    return [job["id"] for job in response.get_json()["jobs"]]


def test_list_order_and_cursor_pagination(client, tenant, seven_jobs):
    assert list_ids(client, tenant) == seven_jobs[::-1]

    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/jobs", query_string=params, headers=tenant.headers).get_json()
        pages += 1
        assert len(page["jobs"]) <= 3
        seen += [job["id"] for job in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert pages < 10
    assert pages == 3
    assert seen == seven_jobs[::-1]

    # A page that ends exactly at the last job has no next cursor.
    first = client.get("/v1/jobs", query_string={"limit": 7}, headers=tenant.headers).get_json()
    assert len(first["jobs"]) == 7 and first["next_cursor"] is None
    page = client.get("/v1/jobs", query_string={"limit": 6}, headers=tenant.headers).get_json()
    rest = client.get("/v1/jobs", query_string={"limit": 6, "cursor": page["next_cursor"]},
                      headers=tenant.headers).get_json()
    assert [j["id"] for j in rest["jobs"]] == [seven_jobs[0]] and rest["next_cursor"] is None

    # Cursors compose with filters.
    probes = [job_id for n, job_id in enumerate(seven_jobs) if n % 3 != 2]
    first = client.get("/v1/jobs", query_string={"kind": "probe", "limit": 2}, headers=tenant.headers).get_json()
    ids = [j["id"] for j in first["jobs"]]
    cursor = first["next_cursor"]
    while cursor:
        page = client.get("/v1/jobs", query_string={"kind": "probe", "limit": 2, "cursor": cursor},
                          headers=tenant.headers).get_json()
        ids += [j["id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
    assert ids == probes[::-1]


def test_list_filters(client, tenant, seven_jobs, ledger, settings):
    newest_first = seven_jobs[::-1]
    by_index = dict(enumerate(seven_jobs))
    for n in (1, 4):
        assert client.post(f"/v1/jobs/{by_index[n]}/cancel", headers=tenant.headers).status_code == 202
    cancelled = [by_index[4], by_index[1]]

    assert list_ids(client, tenant, status="cancelled") == cancelled
    assert list_ids(client, tenant, status="queued") == [i for i in newest_first if i not in cancelled]
    assert list_ids(client, tenant, status="completed") == []
    assert list_ids(client, tenant, kind="thumbnail") == [by_index[5], by_index[2]]
    assert list_ids(client, tenant, kind="probe") == [i for i in newest_first if i not in (by_index[5], by_index[2])]
    assert list_ids(client, tenant, kind="transcode") == []
    assert list_ids(client, tenant, workspace="probes") == [by_index[3], by_index[1]]
    assert list_ids(client, tenant, workspace="thumbs") == [by_index[5], by_index[2]]
    assert list_ids(client, tenant, workspace="nope") == []
    assert list_ids(client, tenant, kind="probe", workspace="default", status="queued") == [by_index[6], by_index[0]]

    created = {job_id: ledger.get(uuid.UUID(job_id))["created_at"] for job_id in seven_jobs}
    assert len(set(created.values())) == 7
    pivot = created[by_index[3]]
    assert list_ids(client, tenant, created_after=pivot.isoformat()) == [by_index[6], by_index[5], by_index[4]]
    assert list_ids(client, tenant, created_before=pivot.isoformat()) == [by_index[2], by_index[1], by_index[0]]
    assert list_ids(client, tenant, created_after=created[by_index[1]].isoformat(),
                    created_before=created[by_index[5]].isoformat()) == [by_index[4], by_index[3], by_index[2]]
    assert list_ids(client, tenant, created_after=created[by_index[6]].isoformat()) == []


INVALID_LIST_ARGS = [
    ({"limit": 0}, "limit"),
    ({"limit": 201}, "limit"),
    ({"limit": -1}, "limit"),
    ({"limit": "ten"}, "limit"),
    ({"status": "exploded"}, "status"),
    ({"kind": "rm"}, "kind"),
    ({"created_after": "yesterday"}, "created_after"),
    ({"created_after": "2026-01-01T00:00:00"}, "created_after"),   # naive: ambiguous
    ({"created_before": "2026-13-01T00:00:00Z"}, "created_before"),
]


def test_invalid_list_arguments_are_422(client, tenant, settings):
    def check(case):
        params, field = case
        error = assert_error(client.get("/v1/jobs", query_string=params, headers=tenant.headers), settings, 422)
        assert field in error_fields(error), error

    check_each([(repr(case[0]), case) for case in INVALID_LIST_ARGS], check)
    assert client.get("/v1/jobs", query_string={"limit": 200}, headers=tenant.headers).status_code == 200


GARBAGE_CURSORS = [
    "garbage",
    "!!!!",
    "x" * 201,
    b64({"created_at": "2026-01-01T00:00:00+00:00"}),
    b64(["not a date", RANDOM_ID]),
    b64(["2026-01-01T00:00:00+00:00", "not a uuid"]),
    b64([None, None]),
    b64(["2026-01-01T00:00:00+00:00"]),
    b64(["2026-01-01T00:00:00+00:00", RANDOM_ID, "extra"]),
    b64("just a string"),
    base64.urlsafe_b64encode(b"\xff\xfe\xfd").decode(),
]


def test_a_garbage_cursor_is_422(client, tenant, settings):
    def check(cursor):
        response = client.get("/v1/jobs", query_string={"cursor": cursor}, headers=tenant.headers)
        assert "cursor" in error_fields(assert_error(response, settings, 422))

    check_each([(repr(cursor[:40]), cursor) for cursor in GARBAGE_CURSORS], check)


def test_a_cursor_with_a_non_string_id_is_422(client, tenant, settings):
    def check(payload):
        response = client.get("/v1/jobs", query_string={"cursor": b64(payload)}, headers=tenant.headers)
        assert "cursor" in error_fields(assert_error(response, settings, 422))

    check_each([(repr(p), p) for p in (["2026-01-01T00:00:00+00:00", 7], ["2026-01-01T00:00:00+00:00", [RANDOM_ID]])],
               check)


def test_a_workspace_filter_with_a_nul_character_is_rejected_or_empty(client, tenant, settings):
    response = client.get("/v1/jobs", query_string={"workspace": "a\x00b"}, headers=tenant.headers)
    if response.status_code == 200:
        assert response.get_json()["jobs"] == []
    else:
        assert_error(response, settings, 422)


# -- cancel --------------------------------------------------------------------------------


def cancel(client, tenant, job_id, how):
    if how == "POST":
        return client.post(f"/v1/jobs/{job_id}/cancel", headers=tenant.headers)
    return client.delete(f"/v1/jobs/{job_id}", headers=tenant.headers)


def test_cancel_a_queued_job(client, tenant, media, ledger, settings, purge_queue):
    check_each([(how, how) for how in ("POST", "DELETE")],
               lambda how: check_cancel_queued(client, tenant, ledger, settings, how))


def check_cancel_queued(client, tenant, ledger, settings, how):
    job_id = submit(client, tenant, PROBE).get_json()["id"]
    bystander = submit(client, tenant, PROBE).get_json()["id"]
    response = cancel(client, tenant, job_id, how)
    assert response.status_code == 202, response.get_data(as_text=True)
    job = response.get_json()
    assert job["id"] == job_id and job["status"] == "cancelled"
    assert job["error"]["code"] == "cancelled" and job["error"]["message"]
    assert job["finished_at"] is not None and job["cancel_requested_at"] is not None
    assert job["result"] is None
    assert transitions(ledger, job_id) == [(None, "queued"), ("queued", "cancelled")]
    assert client.get(f"/v1/jobs/{job_id}", headers=tenant.headers).get_json() == job
    row = ledger.get(uuid.UUID(job_id))

    for again in ("POST", "DELETE"):
        error = assert_error(cancel(client, tenant, job_id, again), settings, 409)
        assert "cancelled" in error["message"]
    assert transitions(ledger, job_id) == [(None, "queued"), ("queued", "cancelled")]
    after = ledger.get(uuid.UUID(job_id))
    assert (after["finished_at"], after["cancel_requested_at"], after["updated_at"]) == (
        row["finished_at"], row["cancel_requested_at"], row["updated_at"])
    # Only the named job was cancelled.
    assert ledger.get(uuid.UUID(bystander))["status"] == "queued"


def test_cancel_of_running_completed_and_missing_jobs(client, tenant, media, ledger, settings, purge_queue):
    for how in ("POST", "DELETE"):
        assert_error(cancel(client, tenant, RANDOM_ID, how), settings, 404)

    job_id = uuid.UUID(submit(client, tenant, PROBE).get_json()["id"])
    claim = ledger.claim(job_id, "test-worker")
    ledger.complete(job_id, claim.token, {"media": {"duration_s": 1.0}})
    before = client.get(f"/v1/jobs/{job_id}", headers=tenant.headers).get_json()
    assert before["status"] == "completed" and before["result"] == {"media": {"duration_s": 1.0}}
    for how in ("POST", "DELETE"):
        assert_error(cancel(client, tenant, job_id, how), settings, 409)
    assert client.get(f"/v1/jobs/{job_id}", headers=tenant.headers).get_json() == before

    # A running job is flagged for its worker and stays running until the worker stops.
    job_id = uuid.UUID(submit(client, tenant, PROBE).get_json()["id"])
    ledger.claim(job_id, "test-worker")
    response = cancel(client, tenant, job_id, "POST")
    assert response.status_code == 202
    job = response.get_json()
    assert job["status"] == "running" and job["cancel_requested_at"] is not None and job["error"] is None
    assert transitions(ledger, job_id) == [(None, "queued"), ("queued", "running")]


# -- Idempotency-Key ------------------------------------------------------------------------


def test_idempotency_key_replays_and_conflicts(app, client, tenant, media, engine, ledger, settings, purge_queue):
    first = submit(client, tenant, PROBE, **{"Idempotency-Key": "upload-1"})
    again = client.post("/v1/jobs", data=json.dumps({"input": "in.mp4", "kind": "probe"}),
                        content_type="application/json", headers={**tenant.headers, "Idempotency-Key": "upload-1"})
    assert first.status_code == again.status_code == 202
    assert first.get_json()["id"] == again.get_json()["id"]
    assert again.headers["Location"] == first.headers["Location"]
    assert job_count(engine) == 1
    assert transitions(ledger, first.get_json()["id"]) == [(None, "queued")]
    assert queued_job_ids(app, settings) == [first.get_json()["id"]]


    assert_error(submit(client, tenant, PROBE, **{"Idempotency-Key": "k" * 201}), settings, 422)
    assert job_count(engine) == 1

    # The same key with another body is a conflict, and changes nothing.
    first = submit(client, tenant, PROBE, **{"Idempotency-Key": "upload-2"}).get_json()
    other = {"kind": "thumbnail", "input": "in.mp4", "output": "t.jpg"}
    for body in (other, {**PROBE, "priority": 1}, {**PROBE, "metadata": {"v": 2}}):
        response = submit(client, tenant, body, **{"Idempotency-Key": "upload-2"})
        assert_error(response, settings, 409)
    assert job_count(engine) == 2
    assert ledger.get(uuid.UUID(first["id"]))["kind"] == "probe"
    assert transitions(ledger, first["id"]) == [(None, "queued")]


def test_the_key_is_scoped_to_the_tenant(client, tenant, other_tenant, make_clip, media, engine, settings, purge_queue):
    make_clip(other_tenant.media / "in.mp4")
    mine = submit(client, tenant, PROBE, **{"Idempotency-Key": "shared"})
    theirs = submit(client, other_tenant, {**PROBE, "priority": 9}, **{"Idempotency-Key": "shared"})
    assert mine.status_code == theirs.status_code == 202
    assert mine.get_json()["id"] != theirs.get_json()["id"]
    assert job_count(engine, tenant) == 1 and job_count(engine, other_tenant) == 1
    again = submit(client, other_tenant, {**PROBE, "priority": 9}, **{"Idempotency-Key": "shared"})
    assert again.get_json()["id"] == theirs.get_json()["id"]

    # Without a key, identical bodies are separate jobs.
    ids = {submit(client, tenant, PROBE).get_json()["id"] for _ in range(2)}
    assert len(ids) == 2 and job_count(engine, tenant) == 3


def test_concurrent_identical_submissions_make_one_job(app, tenant, media, engine, settings, purge_queue):
    workers = 10
    barrier = threading.Barrier(workers)
    responses: list = [None] * workers
    failures: list = []

    def post(slot: int) -> None:
        try:
            own_client = app.test_client()
            barrier.wait(timeout=10)
            responses[slot] = own_client.post(
                "/v1/jobs", json=PROBE, headers={**tenant.headers, "Idempotency-Key": "burst"}
            )
        except Exception as exc:  # surfaced below: a thread's exception would be lost
            failures.append(exc)

    threads = [threading.Thread(target=post, args=(n,)) for n in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not failures, failures
    assert [r.status_code for r in responses] == [202] * workers, [r.get_data(as_text=True) for r in responses]
    assert len({r.get_json()["id"] for r in responses}) == 1
    assert job_count(engine) == 1
    assert queued_job_ids(app, settings) == [responses[0].get_json()["id"]]
