"""The dashboard through the Flask test client: sign-in, sessions, CSRF, tenant isolation,
filters, bulk actions, the live stream, and POST /v1/jobs/{id}/retry."""
from __future__ import annotations

import json
import re
import uuid

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from ffworker.cli import cli
from ffworker.ui import sessions
from tests.helpers import make_celery_current

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def make_job(ledger, tenant, *, kind="probe", workspace="default", status="queued") -> dict:
    job, _ = ledger.create(tenant_id=tenant.id, kind=kind, spec={"input": "in.mp4"}, workspace=workspace,
                           priority=0, metadata={}, max_attempts=1, timeout_s=60)
    if status in ("running", "failed", "completed"):
        claim = ledger.claim(job["id"], "test-worker:1")
        if status == "failed":
            ledger.fail(job["id"], claim.token, code="invalid_input", message="not a media file")
        elif status == "completed":
            ledger.complete(job["id"], claim.token, {"outputs": []})
    elif status == "cancelled":
        ledger.request_cancel(job["id"], tenant.id)
    return ledger.get(job["id"])


def sign_in(client, key: str):
    form = client.get("/ui/login")
    token = CSRF.search(form.get_data(as_text=True)).group(1)
    return client.post("/ui/login", data={"api_key": key, "csrf_token": token})


def csrf_of(client, path: str = "/ui/jobs") -> str:
    return CSRF.search(client.get(path).get_data(as_text=True)).group(1)


def manage(app, *args):
    """``manage.py ARGS`` in this process (its own app: the test app's Celery is made current again)."""
    result = CliRunner().invoke(cli, list(args))
    make_celery_current(app)
    return result


@pytest.fixture
def operator_key(app, engine, clean_ledger):
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM operators"))
    result = manage(app, "operators", "create", "olga")
    assert result.exit_code == 0, result.output
    return result.output.strip().splitlines()[-1]


@pytest.fixture(autouse=True)
def _no_messages_left(purge_queue):
    yield


@pytest.fixture
def app_settings(app):
    """Change the app's settings for one test."""
    services = app.extensions["ffworker"]
    original = services.settings

    def change(**values):
        services.settings = original.with_overrides(**values)

    yield change
    services.settings = original


# -- sign-in and sessions ---------------------------------------------------------------


def test_sign_in_sets_an_opaque_httponly_strict_cookie_backed_by_the_database(client, engine, tenant):
    response = sign_in(client, tenant.key)
    assert response.status_code == 303 and response.headers["Location"].endswith("/ui/jobs")
    cookie = next(h for h in response.headers.getlist("Set-Cookie") if h.startswith(sessions.COOKIE + "="))
    value = cookie.split(";")[0].split("=", 1)[1]
    assert tenant.key not in cookie and len(value) >= 40
    attributes = [part.strip().lower() for part in cookie.split(";")]
    assert "httponly" in attributes and "samesite=strict" in attributes and "path=/ui/" in attributes
    assert "secure" not in attributes  # plain http
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT * FROM ui_sessions")).mappings().all()
    assert len(rows) == 1 and rows[0]["id_sha256"] != value
    assert tenant.key not in json.dumps([dict(r) for r in rows], default=str)
    page = client.get("/ui/jobs")
    assert page.status_code == 200 and "acme" in page.get_data(as_text=True)
    assert tenant.key not in page.get_data(as_text=True)


def test_cookie_is_secure_over_https_and_behind_a_trusted_proxy_only(app, clean_ledger, tenant, app_settings):
    def cookie_attributes(response):
        cookie = next(h for h in response.headers.getlist("Set-Cookie") if h.startswith(sessions.COOKIE + "="))
        return [part.strip().lower() for part in cookie.split(";")]

    def sign_in_with(**kwargs):
        client = app.test_client()
        form = client.get("/ui/login", **kwargs)
        token = CSRF.search(form.get_data(as_text=True)).group(1)
        return client.post("/ui/login", data={"api_key": tenant.key, "csrf_token": token}, **kwargs)

    assert "secure" in cookie_attributes(sign_in_with(base_url="https://localhost"))
    forwarded = {"headers": {"X-Forwarded-Proto": "https"}}
    assert "secure" not in cookie_attributes(sign_in_with(**forwarded))  # nobody said to trust it
    app_settings(trust_proxy=True)
    assert "secure" in cookie_attributes(sign_in_with(**forwarded))


def test_wrong_key_and_missing_login_token_are_refused(client, engine, tenant):
    assert sign_in(client, "ffw_not-a-key").status_code == 401
    assert "not recognised" in sign_in(client, "x").get_data(as_text=True)
    refused = client.post("/ui/login", data={"api_key": tenant.key})  # no token
    assert refused.status_code == 403
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM ui_sessions")).scalar() == 0


def test_pages_need_a_session(client, tenant):
    for path in ("/ui/jobs", "/ui/overview", f"/ui/jobs/{uuid.uuid4()}", "/ui/jobs/bulk?action=retry"):
        response = client.get(path)
        assert response.status_code == 303 and response.headers["Location"].endswith("/ui/login"), path
    assert client.get("/ui/stream").status_code == 401
    assert client.get("/ui/").status_code == 303


def test_sign_out_ends_the_session_and_a_revoked_key_ends_its_sessions(app, client, engine, tenant):
    sign_in(client, tenant.key)
    token = csrf_of(client)
    response = client.post("/ui/logout", data={"csrf_token": token})
    assert response.status_code == 303
    assert client.get("/ui/jobs").status_code == 303
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM ui_sessions")).scalar() == 0

    sign_in(client, tenant.key)
    assert client.get("/ui/jobs").status_code == 200
    assert manage(app, "tenants", "revoke-key", tenant.key).exit_code == 0
    assert client.get("/ui/jobs").status_code == 303


# -- isolation and not found ------------------------------------------------------------------


def test_another_tenants_job_is_the_same_not_found_page_as_a_made_up_id(client, ledger, tenant, other_tenant):
    mine = make_job(ledger, tenant)
    theirs = make_job(ledger, other_tenant)
    sign_in(client, tenant.key)
    assert client.get(f"/ui/jobs/{mine['id']}").status_code == 200
    pages = [client.get(f"/ui/jobs/{job_id}") for job_id in (theirs["id"], uuid.uuid4(), "not-an-id")]
    assert {page.status_code for page in pages} == {404}
    assert len({page.get_data() for page in pages}) == 1
    listing = client.get("/ui/jobs").get_data(as_text=True)
    assert str(mine["id"]) in listing and str(theirs["id"]) not in listing
    # Nor can a tenant act on it, or watch it.
    token = csrf_of(client)
    assert client.post(f"/ui/jobs/{theirs['id']}/cancel", data={"csrf_token": token}).status_code == 404
    assert ledger.get(theirs["id"])["status"] == "queued"
    # ?tenant= is an operator's filter: a tenant's is ignored.
    assert str(theirs["id"]) not in client.get("/ui/jobs?tenant=globex").get_data(as_text=True)


# -- CSRF ----------------------------------------------------------------------------------------


def test_actions_without_the_csrf_token_are_refused_and_change_nothing(client, engine, ledger, tenant):
    queued = make_job(ledger, tenant)
    failed = make_job(ledger, tenant, status="failed")
    sign_in(client, tenant.key)

    def events():
        with engine.connect() as conn:
            return conn.execute(text("SELECT count(*) FROM job_events")).scalar()

    before = events()
    for data in ({}, {"csrf_token": "forged"}):
        assert client.post(f"/ui/jobs/{queued['id']}/cancel", data=data).status_code == 403
        assert client.post(f"/ui/jobs/{failed['id']}/retry", data=data).status_code == 403
        assert client.post("/ui/jobs/bulk", data={**data, "action": "retry", "as_of": "2999-01-01T00:00"}
                           ).status_code == 403
        assert client.post("/ui/logout", data=data).status_code == 403
    assert ledger.get(queued["id"])["status"] == "queued"
    assert ledger.get(failed["id"])["status"] == "failed"
    assert events() == before
    assert client.get("/ui/jobs").status_code == 200  # still signed in

    token = csrf_of(client)
    assert client.post(f"/ui/jobs/{queued['id']}/cancel", data={"csrf_token": token}).status_code == 303
    assert ledger.get(queued["id"])["status"] == "cancelled"


# -- operators ------------------------------------------------------------------------------------


def test_operator_sees_every_tenant_and_filters_by_tenant(client, ledger, tenant, other_tenant, operator_key):
    mine, theirs = make_job(ledger, tenant), make_job(ledger, other_tenant)
    assert sign_in(client, operator_key).status_code == 303
    page = client.get("/ui/jobs").get_data(as_text=True)
    assert str(mine["id"]) in page and str(theirs["id"]) in page and "operator" in page
    only = client.get("/ui/jobs?tenant=globex").get_data(as_text=True)
    assert str(theirs["id"]) in only and str(mine["id"]) not in only
    assert str(mine["id"]) not in client.get("/ui/jobs?tenant=nobody").get_data(as_text=True)
    assert client.get(f"/ui/jobs/{theirs['id']}").status_code == 200
    assert client.get("/ui/overview").status_code == 200


def test_operator_key_is_not_an_api_key_and_revoking_it_ends_its_sessions(app, client, operator_key):
    assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {operator_key}"}).status_code == 401
    sign_in(client, operator_key)
    assert client.get("/ui/jobs").status_code == 200
    listed = manage(app, "operators", "list")
    assert "olga" in listed.output and operator_key not in listed.output
    assert manage(app, "operators", "revoke", "olga").exit_code == 0
    assert client.get("/ui/jobs").status_code == 303


# -- the jobs page ----------------------------------------------------------------------------------


def test_filters_search_and_pagination(client, ledger, tenant, app):
    from ffworker.ui import views

    failed = make_job(ledger, tenant, status="failed", kind="transcode")
    queued = [make_job(ledger, tenant, workspace="w2") for _ in range(3)]
    sign_in(client, tenant.key)
    page = client.get("/ui/jobs?status=failed").get_data(as_text=True)
    assert str(failed["id"]) in page and str(queued[0]["id"]) not in page
    page = client.get("/ui/jobs?workspace=w2&kind=probe").get_data(as_text=True)
    assert all(str(j["id"]) in page for j in queued) and str(failed["id"]) not in page
    assert client.get("/ui/jobs?status=bogus").status_code == 400
    assert client.get("/ui/jobs?created_after=yesterday").status_code == 400
    assert str(failed["id"]) not in client.get("/ui/jobs?created_after=2999-01-01T00:00").get_data(as_text=True)
    # Search: a whole id opens the job, a prefix lists the matches.
    whole = client.get(f"/ui/jobs?q={failed['id']}")
    assert whole.status_code == 303 and whole.headers["Location"].endswith(f"/ui/jobs/{failed['id']}")
    prefix = str(queued[1]["id"])[:6]
    assert str(queued[1]["id"]) in client.get(f"/ui/jobs?q={prefix}").get_data(as_text=True)
    # Progress bars carry their value for assistive technology.
    assert 'role="progressbar"' in page and 'aria-valuenow="0"' in page
    # Cursor pagination, newest first.
    views.PAGE_SIZE, original = 2, views.PAGE_SIZE
    try:
        first = client.get("/ui/jobs").get_data(as_text=True)
        older = re.search(r'rel="next" href="([^"]+)"', first).group(1).replace("&amp;", "&")
        second = client.get(older).get_data(as_text=True)
    finally:
        views.PAGE_SIZE = original
    ids = [str(j["id"]) for j in (failed, *queued)][::-1]
    assert ids[0] in first and ids[1] in first and ids[2] not in first
    assert ids[2] in second and ids[3] in second and ids[0] not in second


def test_job_page_shows_spec_error_attempts_and_audit_trail(client, ledger, tenant):
    failed = make_job(ledger, tenant, status="failed")
    sign_in(client, tenant.key)
    page = client.get(f"/ui/jobs/{failed['id']}").get_data(as_text=True)
    for fragment in ("invalid_input", "not a media file", "in.mp4", "submitted", "claimed", "1 of 1",
                     ">Retry<", 'id="chart"'):
        assert fragment in page, fragment
    assert ">Cancel<" not in page


def test_retry_from_the_job_page_requeues_the_same_job_with_a_fresh_allowance(client, ledger, settings, tenant):
    failed = make_job(ledger, tenant, status="failed")
    sign_in(client, tenant.key)
    response = client.post(f"/ui/jobs/{failed['id']}/retry", data={"csrf_token": csrf_of(client)})
    assert response.status_code == 303
    row = ledger.get(failed["id"])
    assert row["status"] == "queued" and row["attempts"] == 1
    assert row["max_attempts"] == 1 + settings.max_attempts
    last = ledger.events(failed["id"])[-1]
    assert (last["from_status"], last["to_status"], last["reason"]) == ("failed", "queued", "retried by request")
    trail = client.get(f"/ui/jobs/{failed['id']}").get_data(as_text=True).split('id="trail"')[1]
    assert re.findall(r'<td class="actor">(\w+)</td>', trail) == ["api", "worker", "worker", "api"]


# -- bulk actions -----------------------------------------------------------------------------------


def test_bulk_retry_confirms_the_count_then_requeues_exactly_the_matching_jobs(client, engine, ledger, tenant,
                                                                               other_tenant):
    failed = [make_job(ledger, tenant, status="failed") for _ in range(4)]
    other_kind = make_job(ledger, tenant, status="failed", kind="transcode")
    theirs = make_job(ledger, other_tenant, status="failed")
    sign_in(client, tenant.key)
    confirm = client.get("/ui/jobs/bulk?action=retry&status=failed&kind=probe")
    body = confirm.get_data(as_text=True)
    assert confirm.status_code == 200 and '<strong id="count">4</strong>' in body
    form = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', body))
    done = client.post("/ui/jobs/bulk", data=form)
    assert done.status_code == 200 and 'data-count="4"' in done.get_data(as_text=True)
    assert {ledger.get(j["id"])["status"] for j in failed} == {"queued"}
    assert ledger.get(other_kind["id"])["status"] == "failed"
    assert ledger.get(theirs["id"])["status"] == "failed"
    with engine.connect() as conn:
        audited = conn.execute(text("SELECT count(*) FROM job_events WHERE reason = 'retried by request'")).scalar()
    assert audited == 4


def test_bulk_retry_in_several_batches(ledger, tenant):
    jobs = [make_job(ledger, tenant, status="failed") for _ in range(5)]
    ids = ledger.retry_matching({"tenant_id": tenant.id}, 3, batch=2)
    assert sorted(map(str, ids)) == sorted(str(j["id"]) for j in jobs)
    assert {ledger.get(j["id"])["max_attempts"] for j in jobs} == {4}


def test_bulk_cancel_leaves_jobs_submitted_after_the_confirmation(client, ledger, tenant):
    queued = [make_job(ledger, tenant) for _ in range(3)]
    running = make_job(ledger, tenant, status="running")
    sign_in(client, tenant.key)
    body = client.get("/ui/jobs/bulk?action=cancel").get_data(as_text=True)
    assert '<strong id="count">4</strong>' in body
    later = make_job(ledger, tenant)
    form = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', body))
    assert 'data-count="4"' in client.post("/ui/jobs/bulk", data=form).get_data(as_text=True)
    assert {ledger.get(j["id"])["status"] for j in queued} == {"cancelled"}
    flagged = ledger.get(running["id"])
    assert flagged["status"] == "running" and flagged["cancel_requested_at"] is not None
    assert ledger.get(later["id"])["status"] == "queued"
    assert [e["reason"] for e in ledger.events(queued[0]["id"])][-1] == "cancelled by request"


# -- the live stream ---------------------------------------------------------------------------------


def read_events(response, wanted: int) -> list[tuple[str, dict]]:
    events, buffer = [], b""
    for chunk in response.response:
        buffer += chunk
        while b"\n\n" in buffer:
            block, buffer = buffer.split(b"\n\n", 1)
            lines = dict(line.split(": ", 1) for line in block.decode().splitlines() if ": " in line)
            if "event" in lines:
                events.append((lines["event"], json.loads(lines["data"])))
        if len(events) >= wanted:
            return events
    return events


def test_the_page_stream_sends_new_jobs_of_its_filter_and_changes_of_the_shown_ones(client, ledger, tenant,
                                                                                   other_tenant):
    shown = make_job(ledger, tenant)
    sign_in(client, tenant.key)
    page = client.get("/ui/jobs?kind=probe").get_data(as_text=True)
    stream_url = re.search(r'data-stream="([^"]+)"', page).group(1).replace("&amp;", "&")
    make_job(ledger, other_tenant)          # not this tenant's
    make_job(ledger, tenant, kind="hls")    # not this filter's
    new = make_job(ledger, tenant)
    ledger.claim(shown["id"], "w:1")
    response = client.get(stream_url, buffered=False)
    try:
        assert response.status_code == 200 and response.mimetype == "text/event-stream"
        events = read_events(response, 2)
    finally:
        response.close()
    by_id = {data["id"]: data for _, data in events}
    assert set(by_id) == {str(shown["id"]), str(new["id"])}
    assert by_id[str(new["id"])]["new"] is True and 'role="progressbar"' in by_id[str(new["id"])]["html"]
    assert by_id[str(shown["id"])]["status"] == "running"


# -- the REST endpoint --------------------------------------------------------------------------------


def test_rest_retry(client, ledger, settings, tenant, other_tenant):
    failed = make_job(ledger, tenant, status="failed")
    response = client.post(f"/v1/jobs/{failed['id']}/retry", headers=tenant.headers)
    assert response.status_code == 202
    assert response.json["status"] == "queued" and response.json["max_attempts"] == 1 + settings.max_attempts
    assert client.post(f"/v1/jobs/{failed['id']}/retry", headers=tenant.headers).status_code == 409
    cancelled = make_job(ledger, tenant, status="cancelled")
    assert client.post(f"/v1/jobs/{cancelled['id']}/retry", headers=tenant.headers).status_code == 202
    theirs = make_job(ledger, other_tenant, status="failed")
    assert client.post(f"/v1/jobs/{theirs['id']}/retry", headers=tenant.headers).status_code == 404
    assert client.post(f"/v1/jobs/{uuid.uuid4()}/retry", headers=tenant.headers).status_code == 404
    assert ledger.get(theirs["id"])["status"] == "failed"


def test_the_page_stream_takes_a_slot_shared_with_the_rest_streams_and_ends_when_the_process_drains(
        app, client, ledger, tenant):
    shown = make_job(ledger, tenant)
    sign_in(client, tenant.key)
    state = app.extensions["ffworker_events"]
    url = f"/ui/stream?ids={shown['id']}"
    taken = 0
    while state.slots.try_acquire():  # every slot taken, as by REST event streams
        taken += 1
    try:
        full = client.get(url)
        assert full.status_code == 503 and full.headers["Retry-After"] == str(state.limits.retry_after_s)
    finally:
        for _ in range(taken):
            state.slots.release()
    before = state.slots.open
    response = client.get(url, buffered=False)
    try:
        assert state.slots.open == before + 1
        assert [name for name, _ in read_events(response, 1)] == ["job"]
        state.hub.draining = True  # what SIGTERM does (listener.drain): the stream ends at its next tick
        assert b"".join(response.response) == b""
    finally:
        state.hub.draining = False
        response.close()
    assert state.slots.open == before
