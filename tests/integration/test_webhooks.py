"""Webhooks in one process: the outbox trigger, the API, signing, the retry schedule and the
SSRF guard, against real PostgreSQL and a real HTTP receiver on loopback."""
from __future__ import annotations

import json
import socket
import uuid

import pytest
from click.testing import CliRunner
from sqlalchemy import text, update
from standardwebhooks import Webhook

from ffworker import delivery, ledger as ledger_module, urlguard, webhooks
from ffworker.cli import cli
from ffworker.client import WebhookVerificationError, verify_webhook
from ffworker.maintenance.prune import prune_jobs
from tests.integration.test_ledger import backdate

pytestmark = pytest.mark.integration

ALL_EVENTS = ["job.started", "job.completed", "job.failed", "job.cancelled"]
GUARDED_URLS = [
    "http://127.0.0.1/hook", "http://10.0.0.1/hook", "http://169.254.169.254/latest/meta-data/",
    "http://[::1]/hook", "http://localhost/hook", "http://0.0.0.0/", "http://[::]/", "http://[::ffff:127.0.0.1]/",
    "http://2130706433/", "http://0x7f.1/", "http://192.168.1.1/", "http://[fd00::1]/", "http://[fe80::1]/",
    "http://224.0.0.1/", "http://100.100.100.200/", "http://app.localhost/",
]


def add_endpoint(client, tenant, url, events=ALL_EVENTS, **extra) -> dict:
    response = client.post("/v1/webhooks", json={"url": url, "events": events, **extra}, headers=tenant.headers)
    assert response.status_code == 201, response.json
    return response.json


def new_job(ledger, tenant, *, webhook_url=None, workspace="default", max_attempts=3) -> dict:
    row, _ = ledger.create(tenant_id=tenant.id, kind="probe", spec={"input": "a.mp4"}, workspace=workspace,
                           priority=0, metadata={"m": 1}, max_attempts=max_attempts, timeout_s=60,
                           webhook_url=webhook_url)
    return row


def run_to_completion(ledger, job_id) -> dict:
    claim = ledger.claim(job_id, "host-a:1")
    return ledger.complete(job_id, claim.token, {"outputs": []})


def deliveries(engine, **where) -> list[dict]:
    clause = " AND ".join(f"{k} = :{k}" for k in where) or "true"
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(text(
            f"SELECT * FROM webhook_deliveries WHERE {clause} ORDER BY created_at, event"), where).mappings()]


def attempts(engine, delivery_id) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(text(
            "SELECT * FROM webhook_attempts WHERE delivery_id = :id ORDER BY attempt"), {"id": delivery_id}).mappings()]


def make_due(engine, delivery_id) -> None:
    """Backdate the next attempt: the schedule is driven without waiting through it."""
    with engine.begin() as conn:
        conn.execute(text("UPDATE webhook_deliveries SET next_attempt_at = now() - interval '1 ms' WHERE id = :id"),
                     {"id": delivery_id})


# -- the outbox ------------------------------------------------------------------------


def test_transitions_write_one_delivery_per_subscribed_endpoint(client, ledger, engine, tenant, other_tenant,
                                                                private_ok):
    everything = add_endpoint(client, tenant, "http://127.0.0.1:9/all")
    finished_only = add_endpoint(client, tenant, "http://127.0.0.1:9/done", ["job.completed"])
    add_endpoint(client, tenant, "http://127.0.0.1:9/ws", ALL_EVENTS, workspace="elsewhere")
    disabled = add_endpoint(client, tenant, "http://127.0.0.1:9/off")
    client.patch(f"/v1/webhooks/{disabled['id']}", json={"enabled": False}, headers=tenant.headers)
    add_endpoint(client, other_tenant, "http://127.0.0.1:9/other")

    job = new_job(ledger, tenant)
    assert deliveries(engine) == []  # submission is not an event
    run_to_completion(ledger, job["id"])
    rows = deliveries(engine)
    assert sorted((str(r["endpoint_id"]), r["event"]) for r in rows) == sorted([
        (everything["id"], "job.started"), (everything["id"], "job.completed"),
        (finished_only["id"], "job.completed")])
    assert len({r["webhook_id"] for r in rows}) == 3 and all(r["webhook_id"].startswith("msg_") for r in rows)
    assert all(r["status"] == "pending" for r in rows)


def test_the_per_job_webhook_url_gets_the_terminal_event_only(client, ledger, engine, tenant, private_ok):
    response = client.post("/v1/jobs", json={"kind": "probe", "input": "a.mp4", "webhook_url": "http://127.0.0.1:9/j"},
                           headers=tenant.headers)
    # the input does not exist: submit refuses, and no job means no delivery
    assert response.status_code == 422
    (tenant.media / "a.mp4").write_bytes(b"x")
    response = client.post("/v1/jobs", json={"kind": "probe", "input": "a.mp4", "webhook_url": "http://127.0.0.1:9/j"},
                           headers=tenant.headers)
    assert response.status_code == 202, response.json
    job_id = response.json["id"]
    claim = ledger.claim(job_id, "host-a:1")
    assert deliveries(engine) == []
    ledger.fail(job_id, claim.token, code="invalid_input", message="bad input")
    (row,) = deliveries(engine)
    assert (row["event"], row["url"], row["endpoint_id"]) == ("job.failed", "http://127.0.0.1:9/j", None)


def test_the_trigger_sees_a_one_statement_transition_and_a_rollback_leaves_nothing(client, ledger, engine, tenant,
                                                                                  private_ok):
    add_endpoint(client, tenant, "http://127.0.0.1:9/all")
    job = new_job(ledger, tenant)
    jobs = ledger_module.jobs
    claim = ledger_module._transition_statement(
        update(jobs).where(jobs.c.id == job["id"], jobs.c.status == "queued")
        .values(status="running", attempts=jobs.c.attempts + 1, worker="host-b:2", started_at=text("now()"),
                heartbeat_at=text("now()"), updated_at=text("now()")),
        actor="worker", from_status="queued", to_status="running", reason="claimed")
    with engine.connect() as conn:
        transaction = conn.begin()
        row = conn.execute(claim).mappings().one()
        snapshot = conn.execute(text("SELECT job_snapshot FROM webhook_deliveries WHERE job_id = :id"),
                                {"id": job["id"]}).scalar_one()
        # The AFTER trigger ran once the whole statement was done: it saw the UPDATE of its CTE.
        assert snapshot["status"] == "running" and snapshot["attempts"] == row["attempts"] == 1
        assert snapshot["started_at"] is not None and "worker" not in snapshot and "stderr_tail" not in snapshot
        transaction.rollback()
    assert deliveries(engine) == []
    assert ledger.get(job["id"])["status"] == "queued"

    # The same through the ledger's own (committing) claim and completion.
    done = run_to_completion(ledger, job["id"])
    rows = deliveries(engine)
    assert [r["event"] for r in rows] == ["job.started", "job.completed"]
    assert rows[1]["job_snapshot"]["status"] == "completed"
    assert rows[1]["job_snapshot"]["finished_at"] is not None and done["finished_at"] is not None


def _claimed(ledger, tenant, engine, **job):
    row = new_job(ledger, tenant, **job)
    return row, ledger.claim(row["id"], "host-a:1")


def _reap(ledger, engine, job_id) -> None:
    backdate(engine, job_id, heartbeat_at=120)
    with engine.begin() as conn:
        assert [d["id"] for d in ledger.reap_stale(conn, 60)] == [job_id]


def _claim(ledger, tenant, engine):
    return _claimed(ledger, tenant, engine)[0]


def _complete(ledger, tenant, engine):
    job, claim = _claimed(ledger, tenant, engine)
    ledger.complete(job["id"], claim.token, {"outputs": []}, progress={"frame": 7, "fps": 25.0})
    return job


def _fail(ledger, tenant, engine):
    job, claim = _claimed(ledger, tenant, engine)
    ledger.fail(job["id"], claim.token, code="invalid_input", message="bad input", retryable=False)
    return job


def _fail_after_the_last_attempt(ledger, tenant, engine):
    job, claim = _claimed(ledger, tenant, engine, max_attempts=1)
    ledger.fail(job["id"], claim.token, code="io_error", message="EIO", retryable=True)
    return job


def _cancel_queued(ledger, tenant, engine):
    job = new_job(ledger, tenant)
    ledger.request_cancel(job["id"], tenant.id)
    return job


def _record_cancelled(ledger, tenant, engine):
    job, claim = _claimed(ledger, tenant, engine)
    ledger.request_cancel(job["id"], tenant.id)
    ledger.record_cancelled(job["id"], claim.token)
    return job


def _reap_to_failed(ledger, tenant, engine):
    job, _ = _claimed(ledger, tenant, engine, max_attempts=1)
    _reap(ledger, engine, job["id"])
    return job


def _reap_to_cancelled(ledger, tenant, engine):
    job, _ = _claimed(ledger, tenant, engine)
    ledger.request_cancel(job["id"], tenant.id)
    _reap(ledger, engine, job["id"])
    return job


@pytest.mark.parametrize("transition, event", [
    (_claim, "job.started"), (_complete, "job.completed"), (_fail, "job.failed"),
    (_fail_after_the_last_attempt, "job.failed"), (_cancel_queued, "job.cancelled"),
    (_record_cancelled, "job.cancelled"), (_reap_to_failed, "job.failed"), (_reap_to_cancelled, "job.cancelled"),
], ids=lambda value: getattr(value, "__name__", value).lstrip("_"))
def test_each_one_statement_transition_hands_the_trigger_its_own_changes(
        client, ledger, engine, tenant, private_ok, transition, event):
    """The body of every event is the job as GET shows it right after that transition: the
    outbox trigger, fired by the audit row of the transition's own statement, saw the UPDATE."""
    add_endpoint(client, tenant, "http://127.0.0.1:9/all")
    job = transition(ledger, tenant, engine)
    (row,) = deliveries(engine, event=event)
    assert json.loads(delivery.event_body(row))["data"] == client.get(f"/v1/jobs/{job['id']}",
                                                                      headers=tenant.headers).json
    assert row["event_at"] == ledger.events(job["id"])[-1]["at"]


def test_a_retry_is_not_an_event(client, ledger, engine, tenant, private_ok):
    add_endpoint(client, tenant, "http://127.0.0.1:9/all")
    job, claim = _claimed(ledger, tenant, engine)
    assert ledger.fail(job["id"], claim.token, code="io_error", message="EIO", retryable=True)["status"] == "queued"
    _, claim = _claimed(ledger, tenant, engine)  # another job: a stale run with attempts left is requeued
    _reap(ledger, engine, claim.job["id"])
    assert [r["event"] for r in deliveries(engine)] == ["job.started", "job.started"]


def test_webhook_url_is_a_common_field_kept_on_the_job_and_shown_by_get(client, ledger, tenant, private_ok):
    (tenant.media / "a.mp4").write_bytes(b"x")
    url = "http://127.0.0.1:9/hook?token=abc"
    submitted = client.post("/v1/jobs", json={"kind": "probe", "input": "a.mp4", "webhook_url": url},
                            headers=tenant.headers)
    assert submitted.status_code == 202, submitted.json
    assert submitted.json["webhook_url"] == url and "webhook_url" not in submitted.json["spec"]
    assert ledger.get(submitted.json["id"])["webhook_url"] == url
    assert client.get(f"/v1/jobs/{submitted.json['id']}", headers=tenant.headers).json["webhook_url"] == url
    plain = client.post("/v1/jobs", json={"kind": "probe", "input": "a.mp4"}, headers=tenant.headers).json
    assert plain["webhook_url"] is None
    too_long = client.post("/v1/jobs", json={"kind": "probe", "input": "a.mp4", "webhook_url": "http://x/" + "a" * 2048},
                           headers=tenant.headers)
    assert too_long.status_code == 422 and "webhook_url" in too_long.json["errors"]


def test_a_transition_rolled_back_after_its_event_sends_nothing(client, ledger, engine, tenant, private_ok, receiver):
    add_endpoint(client, tenant, receiver.url())
    job = new_job(ledger, tenant)
    claim = ledger.claim(job["id"], "host-a:1")
    with pytest.raises(RuntimeError):
        with engine.begin() as conn:
            conn.execute(ledger_module._COMPLETE, {
                "job_id": job["id"], "token": claim.token, "result": {"outputs": []}, "media_duration_s": None,
                "has_progress": False, **{f"p_{k}": None for k in ledger_module._SNAPSHOT_KEYS}})
            assert len(deliveries(engine)) == 1  # only the started one is visible outside
            raise RuntimeError("the transaction fails after the transition")
    assert [r["event"] for r in deliveries(engine)] == ["job.started"]
    delivery.send(engine, deliveries(engine)[0]["id"], allow_private=True)
    assert [r.json["type"] for r in receiver.received] == ["job.started"]


def test_cancel_of_a_queued_job_is_an_event_and_the_body_is_the_job_as_get_shows_it(
        client, ledger, engine, tenant, private_ok, receiver):
    add_endpoint(client, tenant, receiver.url(), ["job.cancelled"])
    job = new_job(ledger, tenant)
    shown = client.post(f"/v1/jobs/{job['id']}/cancel", headers=tenant.headers).json
    (row,) = deliveries(engine)
    assert delivery.send(engine, row["id"], allow_private=True) == "success"
    (got,) = receiver.received
    assert got.json == {"type": "job.cancelled", "timestamp": got.json["timestamp"], "data": shown}
    assert got.json["data"] == client.get(f"/v1/jobs/{job['id']}", headers=tenant.headers).json
    assert got.headers["content-type"] == "application/json"


# -- signatures --------------------------------------------------------------------------


def test_signatures_verify_with_the_standardwebhooks_package_across_a_rotation(
        client, ledger, engine, tenant, private_ok, receiver):
    add_endpoint(client, tenant, receiver.url(), ["job.completed"])
    first = client.get("/v1/webhooks/secret", headers=tenant.headers).json["secret"]
    assert first.startswith("whsec_") and client.get("/v1/webhooks/secret", headers=tenant.headers).json["secret"] == first

    run_to_completion(ledger, new_job(ledger, tenant)["id"])
    delivery.send(engine, deliveries(engine)[0]["id"], allow_private=True)
    before = receiver.received[0]
    assert Webhook(first).verify(before.body, before.headers)["type"] == "job.completed"
    assert verify_webhook(before.headers, before.body, first)["data"]["status"] == "completed"
    assert len(before.headers["webhook-signature"].split()) == 1

    rotated = client.post("/v1/webhooks/secret/rotate", headers=tenant.headers).json
    second = rotated["secret"]
    assert second != first and rotated["previous_expires_at"] is not None
    run_to_completion(ledger, new_job(ledger, tenant)["id"])
    pending = [r for r in deliveries(engine) if r["status"] == "pending"]
    delivery.send(engine, pending[0]["id"], allow_private=True)
    after = receiver.received[1]
    assert len(after.headers["webhook-signature"].split()) == 2  # both sign for 24 h
    for secret in (first, second):
        Webhook(secret).verify(after.body, after.headers)
        verify_webhook(after.headers, after.body, secret)
    with pytest.raises(Exception):
        Webhook(webhooks.new_secret()).verify(after.body, after.headers)
    with pytest.raises(WebhookVerificationError):
        verify_webhook(after.headers, after.body + b" ", second)
    with pytest.raises(WebhookVerificationError):
        verify_webhook(after.headers, after.body, second, now=int(after.headers["webhook-timestamp"]) + 600)

    # Once the overlap is over, only the new secret signs.
    with engine.begin() as conn:
        conn.execute(text("UPDATE webhook_secrets SET expires_at = now() - interval '1 s' "
                          "WHERE expires_at IS NOT NULL"))
    with engine.connect() as conn:
        assert webhooks.signing_secrets(conn, tenant.id) == [second]


def test_the_cli_prints_the_secret_on_its_last_line_and_rotates_it(engine, tenant):
    def secret(*args):
        result = CliRunner().invoke(cli, ["tenants", "webhook-secret", tenant.name, *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output.strip().splitlines()[-1]

    first = secret()
    assert first.startswith("whsec_") and secret() == first
    second = secret("--rotate")
    assert second.startswith("whsec_") and second != first and secret() == second
    with engine.connect() as conn:
        assert webhooks.signing_secrets(conn, tenant.id) == [second, first]
        assert conn.execute(text("SELECT count(*) FROM webhook_audit WHERE action = 'secret_rotated'")).scalar() == 1
    result = CliRunner().invoke(cli, ["tenants", "webhook-secret", "nobody"])
    assert result.exit_code != 0


def test_each_attempt_is_signed_afresh_with_the_same_webhook_id(client, ledger, engine, tenant, private_ok, receiver):
    receiver.answers.extend([500])
    add_endpoint(client, tenant, receiver.url(), ["job.completed"])
    secret = webhooks.current_secret(engine, tenant.id)
    run_to_completion(ledger, new_job(ledger, tenant)["id"])
    (row,) = deliveries(engine)
    assert delivery.send(engine, row["id"], allow_private=True) == "http_status"
    with engine.begin() as conn:  # the next attempt is 5 s later: let its clock be 5 s later too
        conn.execute(text("UPDATE webhook_attempts SET started_at = started_at - interval '5 s'"))
    make_due(engine, row["id"])
    assert delivery.send(engine, row["id"], allow_private=True) == "success"
    first, second = receiver.received
    assert first.webhook_id == second.webhook_id == row["webhook_id"]
    assert first.body == second.body
    for got in (first, second):
        Webhook(secret).verify(got.body, got.headers)


# -- retries and the delivery log -------------------------------------------------------------


def test_500_500_200_gives_three_attempts_on_the_schedule(client, ledger, engine, tenant, private_ok, receiver):
    receiver.answers.extend([500, 500, 200])
    endpoint = add_endpoint(client, tenant, receiver.url(), ["job.completed"])
    job = new_job(ledger, tenant)
    run_to_completion(ledger, job["id"])
    (row,) = deliveries(engine)

    assert delivery.send(engine, row["id"], allow_private=True) == "http_status"
    assert delivery.send(engine, row["id"], allow_private=True) is None  # not due yet: nothing sent
    first = deliveries(engine)[0]
    gap = (first["next_attempt_at"] - attempts(engine, row["id"])[0]["finished_at"]).total_seconds()
    assert 5 * 0.9 - 0.05 <= gap <= 5 * 1.1 + 0.05
    make_due(engine, row["id"])
    assert delivery.send(engine, row["id"], allow_private=True) == "http_status"
    second = deliveries(engine)[0]
    gap = (second["next_attempt_at"] - attempts(engine, row["id"])[1]["finished_at"]).total_seconds()
    assert 300 * 0.9 - 0.05 <= gap <= 300 * 1.1 + 0.05
    make_due(engine, row["id"])
    assert delivery.send(engine, row["id"], allow_private=True) == "success"
    assert len(receiver.received) == 3

    log = client.get(f"/v1/webhooks/deliveries?job_id={job['id']}", headers=tenant.headers).json["deliveries"]
    (entry,) = log
    assert entry["status"] == "delivered" and entry["next_attempt_at"] is None
    assert entry["endpoint_id"] == endpoint["id"] and entry["webhook_id"] == row["webhook_id"]
    assert [a["status_code"] for a in entry["attempts"]] == [500, 500, 200]
    assert [a["error_class"] for a in entry["attempts"]] == ["http_status", "http_status", None]
    assert all(a["latency_ms"] > 0 and a["at"] for a in entry["attempts"])
    assert '"status": 500' in entry["attempts"][0]["response"] or '"status":500' in entry["attempts"][0]["response"]
    assert client.get(f"/v1/webhooks/deliveries?endpoint_id={endpoint['id']}&status=delivered",
                      headers=tenant.headers).json["deliveries"][0]["id"] == entry["id"]
    assert client.get("/v1/webhooks/deliveries?status=failed", headers=tenant.headers).json["deliveries"] == []
    with engine.connect() as conn:
        assert conn.execute(text("SELECT failing_since FROM webhook_endpoints")).scalar() is None


def test_after_eight_failures_the_delivery_is_failed_and_a_retry_sends_it_once_more(
        client, ledger, engine, tenant, private_ok, receiver):
    receiver.default = 503
    add_endpoint(client, tenant, receiver.url(), ["job.completed"])
    run_to_completion(ledger, new_job(ledger, tenant)["id"])
    (row,) = deliveries(engine)
    gaps = []
    for n in range(delivery.MAX_ATTEMPTS):
        if n:
            make_due(engine, row["id"])
        assert delivery.send(engine, row["id"], allow_private=True) == "http_status"
        current = deliveries(engine)[0]
        if current["next_attempt_at"] is not None:
            gaps.append((current["next_attempt_at"] - attempts(engine, row["id"])[n]["finished_at"]).total_seconds())
    for gap, planned in zip(gaps, delivery.SCHEDULE_S[1:], strict=True):
        assert planned * 0.9 - 0.05 <= gap <= planned * 1.1 + 0.05
    failed = deliveries(engine)[0]
    assert failed["status"] == "failed" and failed["next_attempt_at"] is None and failed["finished_at"] is not None
    assert delivery.send(engine, row["id"], allow_private=True) is None

    # Replay: the same delivery, one more attempt, now.
    receiver.default = 200
    response = client.post(f"/v1/webhooks/deliveries/{row['id']}/retry", headers=tenant.headers)
    assert response.status_code == 202 and response.json["retry_requested_at"] is not None
    assert delivery.send(engine, row["id"], allow_private=True) == "success"
    entry = client.get(f"/v1/webhooks/deliveries/{row['id']}", headers=tenant.headers).json
    assert entry["status"] == "delivered" and len(entry["attempts"]) == 9
    assert entry["attempts"][-1]["scheduled"] is False and entry["attempts"][-1]["status_code"] == 200
    assert len({r.webhook_id for r in receiver.received}) == 1


def test_a_retry_while_waiting_keeps_the_schedule_when_it_fails(client, ledger, engine, tenant, private_ok, receiver):
    receiver.default = 500
    add_endpoint(client, tenant, receiver.url(), ["job.completed"])
    run_to_completion(ledger, new_job(ledger, tenant)["id"])
    (row,) = deliveries(engine)
    delivery.send(engine, row["id"], allow_private=True)
    waiting = deliveries(engine)[0]["next_attempt_at"]
    assert client.post(f"/v1/webhooks/deliveries/{row['id']}/retry", headers=tenant.headers).status_code == 202
    assert delivery.send(engine, row["id"], allow_private=True) == "http_status"
    after = deliveries(engine)[0]
    assert (after["status"], after["next_attempt_at"], after["retry_requested_at"]) == ("pending", waiting, None)
    assert after["attempts"] == 2 and after["scheduled_attempts"] == 1


def test_an_endpoint_failing_for_five_days_is_disabled_with_an_audit_row(
        client, ledger, engine, tenant, private_ok, receiver):
    receiver.default = 500
    endpoint = add_endpoint(client, tenant, receiver.url(), ["job.started", "job.completed"])
    run_to_completion(ledger, new_job(ledger, tenant)["id"])
    started, completed = deliveries(engine)
    delivery.send(engine, started["id"], allow_private=True)
    assert client.get(f"/v1/webhooks/{endpoint['id']}", headers=tenant.headers).json["failing_since"] is not None
    with engine.begin() as conn:
        conn.execute(text("UPDATE webhook_endpoints SET failing_since = now() - interval '5 days 1 minute'"))
    delivery.send(engine, completed["id"], allow_private=True)
    shown = client.get(f"/v1/webhooks/{endpoint['id']}", headers=tenant.headers).json
    assert shown["enabled"] is False and shown["disabled_reason"].startswith("failing since")
    assert {r["status"] for r in deliveries(engine)} == {"failed"}
    with engine.connect() as conn:
        assert conn.execute(text("SELECT action FROM webhook_audit WHERE endpoint_id = :id ORDER BY id DESC"),
                            {"id": endpoint["id"]}).scalars().first() == "endpoint_disabled"
    # A disabled endpoint gets no new deliveries, and no replay until enabled again.
    run_to_completion(ledger, new_job(ledger, tenant)["id"])
    assert len(deliveries(engine)) == 2
    assert client.post(f"/v1/webhooks/deliveries/{started['id']}/retry", headers=tenant.headers).status_code == 409
    enabled = client.patch(f"/v1/webhooks/{endpoint['id']}", json={"enabled": True}, headers=tenant.headers).json
    assert enabled["enabled"] and enabled["failing_since"] is None
    assert client.post(f"/v1/webhooks/deliveries/{started['id']}/retry", headers=tenant.headers).status_code == 202


def test_a_timeout_is_an_attempt_that_failed(client, ledger, engine, tenant, private_ok, receiver):
    receiver.hold.set()
    add_endpoint(client, tenant, receiver.url(), ["job.completed"])
    run_to_completion(ledger, new_job(ledger, tenant)["id"])
    (row,) = deliveries(engine)
    assert delivery.send(engine, row["id"], allow_private=True, timeout_s=0.5) == "timeout"
    (attempt,) = attempts(engine, row["id"])
    assert attempt["status_code"] is None and 400 <= attempt["latency_ms"] < 5000


def test_a_redirect_is_not_followed(client, ledger, engine, tenant, private_ok, receiver):
    receiver.answers.append(302)
    add_endpoint(client, tenant, receiver.url(), ["job.completed"])
    run_to_completion(ledger, new_job(ledger, tenant)["id"])
    (row,) = deliveries(engine)
    assert delivery.send(engine, row["id"], allow_private=True) == "http_status"
    assert len(receiver.received) == 1 and deliveries(engine)[0]["status"] == "pending"


# -- the API ----------------------------------------------------------------------------------------


def test_endpoint_crud_and_tenant_isolation(client, tenant, other_tenant, engine, private_ok):
    created = add_endpoint(client, tenant, "https://hooks.example.com/ffworker", ["job.completed", "job.failed"],
                           workspace="w1", description="billing")
    assert created["enabled"] is True and created["events"] == ["job.completed", "job.failed"]
    listed = client.get("/v1/webhooks", headers=tenant.headers).json["endpoints"]
    assert [e["id"] for e in listed] == [created["id"]]
    assert client.get("/v1/webhooks", headers=other_tenant.headers).json["endpoints"] == []
    assert client.get(f"/v1/webhooks/{created['id']}", headers=other_tenant.headers).status_code == 404
    assert client.patch(f"/v1/webhooks/{created['id']}", json={"enabled": False},
                        headers=other_tenant.headers).status_code == 404
    patched = client.patch(f"/v1/webhooks/{created['id']}", json={"enabled": False, "description": "x"},
                           headers=tenant.headers).json
    assert patched["enabled"] is False and patched["description"] == "x" and patched["url"] == created["url"]
    assert client.delete(f"/v1/webhooks/{created['id']}", headers=other_tenant.headers).status_code == 404
    assert client.delete(f"/v1/webhooks/{created['id']}", headers=tenant.headers).status_code == 204
    assert client.get(f"/v1/webhooks/{created['id']}", headers=tenant.headers).status_code == 404
    assert client.get("/v1/webhooks").status_code == 401
    bad = client.post("/v1/webhooks", json={"url": "https://x.example", "events": ["job.exploded"]},
                      headers=tenant.headers)
    assert bad.status_code == 422 and "events" in bad.json["errors"]
    assert client.post("/v1/webhooks", json={"url": "https://x.example", "events": []},
                       headers=tenant.headers).status_code == 422
    assert client.get(f"/v1/webhooks/deliveries/{uuid.uuid4()}", headers=tenant.headers).status_code == 404
    assert client.post(f"/v1/webhooks/deliveries/{uuid.uuid4()}/retry", headers=tenant.headers).status_code == 404
    with engine.connect() as conn:
        actions = conn.execute(text("SELECT action FROM webhook_audit ORDER BY id")).scalars().all()
    assert actions == ["endpoint_created", "endpoint_updated", "endpoint_deleted"]
    assert "/v1/webhooks/deliveries/{delivery_id}/retry" in client.get("/openapi.json").json["paths"]


def test_delivery_log_is_per_tenant_and_pruned_with_its_job(client, ledger, engine, tenant, other_tenant, private_ok):
    add_endpoint(client, tenant, "http://127.0.0.1:9/x", ["job.completed"])
    job = new_job(ledger, tenant)
    run_to_completion(ledger, job["id"])
    (row,) = deliveries(engine)
    assert client.get(f"/v1/webhooks/deliveries/{row['id']}", headers=other_tenant.headers).status_code == 404
    assert client.get("/v1/webhooks/deliveries", headers=other_tenant.headers).json["deliveries"] == []
    page = client.get("/v1/webhooks/deliveries?limit=1", headers=tenant.headers).json
    assert len(page["deliveries"]) == 1 and page["next_cursor"] is None
    with engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET finished_at = now() - interval '40 days' WHERE id = :id"),
                     {"id": job["id"]})
    assert prune_jobs(ledger, 30) == 1  # beat's retention duty
    assert deliveries(engine) == []


def test_metrics_count_deliveries_and_show_the_oldest_pending(client, ledger, engine, tenant, private_ok, receiver):
    add_endpoint(client, tenant, receiver.url(), ["job.started", "job.completed"])
    run_to_completion(ledger, new_job(ledger, tenant)["id"])
    started, _ = deliveries(engine)
    delivery.send(engine, started["id"], allow_private=True)
    body = client.get("/metrics").get_data(as_text=True)
    assert 'ffworker_webhook_deliveries_total{outcome="delivered",tenant="acme"} 1.0' in body
    assert 'ffworker_webhook_attempts_total{result="success",tenant="acme"} 1.0' in body
    assert 'ffworker_webhook_delivery_latency_seconds_count{tenant="acme"} 1.0' in body
    assert "ffworker_webhook_deliveries_pending 1.0" in body
    assert "ffworker_webhook_oldest_pending_seconds" in body


# -- the SSRF guard (FFWORKER_ALLOW_PRIVATE_URLS off) -----------------------------------------------


@pytest.mark.parametrize("url", GUARDED_URLS + ["ftp://example.com/x", "file:///etc/passwd", "gopher://x/",
                                                "http://user:pw@example.com/", "http:///nohost", "not a url"])
def test_guarded_urls_are_refused_at_registration_and_submit(client, tenant, url):
    response = client.post("/v1/webhooks", json={"url": url, "events": ["job.completed"]}, headers=tenant.headers)
    assert response.status_code == 422 and "url" in response.json["errors"], response.json
    (tenant.media / "a.mp4").write_bytes(b"x")
    response = client.post("/v1/jobs", json={"kind": "probe", "input": "a.mp4", "webhook_url": url},
                           headers=tenant.headers)
    assert response.status_code == 422 and "webhook_url" in response.json["errors"], response.json


def test_public_urls_pass_the_literal_check():
    for url in ("https://hooks.example.com/a?b=c", "http://93.184.216.34:8080/x", "https://[2606:4700::1111]/"):
        assert urlguard.check_url_literal(url) == url
    assert urlguard.check_url_literal("http://127.0.0.1:8/x", allow_private=True)
    with pytest.raises(urlguard.BlockedURL):
        urlguard.check_url_literal("ftp://127.0.0.1/", allow_private=True)


@pytest.mark.parametrize("url", GUARDED_URLS)
def test_the_sender_refuses_guarded_addresses_without_connecting(url, monkeypatch):
    def no_connection(*args, **kwargs):
        raise AssertionError("a connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", no_connection)
    outcome = delivery.post(url, b"{}", {}, timeout_s=2, allow_private=False)
    assert (outcome.ok, outcome.error_class) == (False, "blocked_address")


def test_a_name_resolving_to_loopback_is_refused_at_connect_time_and_nothing_reaches_the_receiver(
        client, ledger, engine, tenant, private_ok, receiver, monkeypatch):
    # Registered while private URLs were allowed; sent with the guard on (a name that
    # resolved elsewhere at registration and to loopback now is the same case).
    add_endpoint(client, tenant, f"http://localhost:{receiver.port}/hook", ["job.completed"])
    real_getaddrinfo = socket.getaddrinfo

    def rebinding(host, *args, **kwargs):
        return real_getaddrinfo("127.0.0.1" if host == "hooks.rebind.test" else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    job = new_job(ledger, tenant, webhook_url=f"http://hooks.rebind.test:{receiver.port}/job")
    run_to_completion(ledger, job["id"])
    for row in deliveries(engine):
        assert delivery.send(engine, row["id"], allow_private=False) == "blocked_address"
    assert receiver.connections == 0 and receiver.received == []
    log = client.get("/v1/webhooks/deliveries", headers=tenant.headers).json["deliveries"]
    assert {entry["attempts"][0]["error_class"] for entry in log} == {"blocked_address"}


def test_the_guard_checks_the_address_actually_connected_to(monkeypatch, receiver):
    """A resolver that answered a public address, but the socket ends up on loopback."""
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port, *a, **k: [
        (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("93.184.216.34", port))])
    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", lambda sock, address: real_connect(sock, ("127.0.0.1", address[1])))
    outcome = delivery.post(f"http://public.example:{receiver.port}/x", b"{}", {}, timeout_s=2, allow_private=False)
    assert outcome.error_class == "blocked_address" and receiver.received == []


def test_classification_of_addresses():
    import ipaddress

    for address in ("8.8.8.8", "2606:4700::1111", "93.184.216.34"):
        assert urlguard.guarded(ipaddress.ip_address(address)) is None
    for address in ("127.0.0.1", "10.0.0.1", "172.16.0.1", "192.168.0.1", "169.254.169.254", "::1", "fd00::1",
                    "fe80::1", "224.0.0.1", "ff02::1", "0.0.0.0", "::", "::ffff:8.8.8.8", "64:ff9b::a00:1",
                    "2002:7f00:1::", "100.64.0.1", "fd00:ec2::254", "192.0.0.192", "240.0.0.1"):
        assert urlguard.guarded(ipaddress.ip_address(address)), address
