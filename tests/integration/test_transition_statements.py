"""Every state write is one statement: the change, its audit row and its NOTIFY travel
together in one round trip, and a write that matches nothing writes nothing."""
from __future__ import annotations

from contextlib import contextmanager

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import event, text
from sqlalchemy.engine import make_url

from ffworker.errors import AlreadyTerminal, FencedOut, JobNotFound, NotRetryable
from ffworker.metrics import Metrics
from ffworker.models import NOTIFY_CHANNEL

from tests.integration.test_ledger import backdate, new_job

pytestmark = pytest.mark.integration


@contextmanager
def statements(engine):
    """The SQL statements the engine sends while the block runs."""
    sent: list[str] = []

    def record(conn, cursor, statement, *_):
        sent.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(engine, "before_cursor_execute", record)


@pytest.fixture
def listener(settings):
    dsn = make_url(settings.database_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"LISTEN {NOTIFY_CHANNEL}")

        def received() -> list[str]:
            return [n.payload for n in conn.notifies(timeout=0.5)]
        yield received


def test_cancelling_a_queued_job_is_one_statement_with_its_event_and_notice(engine, ledger, tenant, listener):
    job = new_job(ledger, tenant)
    listener()
    with statements(engine) as sent:
        row = ledger.request_cancel(job["id"], tenant.id)
    assert len(sent) == 1 and row["status"] == "cancelled"
    assert [(e["to_status"], e["reason"]) for e in ledger.events(job["id"])][-1] == ("cancelled", "cancelled by request")
    assert listener() == [f"{job['id']}:status"]


def test_cancelling_a_running_job_flags_it_and_notifies_in_one_statement(engine, ledger, tenant, listener):
    job = new_job(ledger, tenant)
    ledger.claim(job["id"], "w")
    events_before = len(ledger.events(job["id"]))
    listener()
    with statements(engine) as sent:
        row = ledger.request_cancel(job["id"], tenant.id)
    assert len(sent) == 1
    assert row["status"] == "running" and row["cancel_requested_at"] is not None
    assert len(ledger.events(job["id"])) == events_before  # a request, not a transition
    assert listener() == [f"{job['id']}:status"]


def test_a_refused_cancel_reads_once_to_say_why_and_changes_nothing(engine, ledger, tenant, other_tenant, listener):
    job = new_job(ledger, tenant)
    ledger.request_cancel(job["id"], tenant.id)
    listener()
    with statements(engine) as sent, pytest.raises(AlreadyTerminal):
        ledger.request_cancel(job["id"], tenant.id)
    assert len(sent) == 2
    with pytest.raises(JobNotFound):
        ledger.request_cancel(job["id"], other_tenant.id)
    assert listener() == []


@pytest.mark.parametrize("retryable", [True, False])
def test_a_failure_is_one_statement(engine, ledger, tenant, listener, retryable):
    job = new_job(ledger, tenant)
    claim = ledger.claim(job["id"], "w")
    listener()
    with statements(engine) as sent:
        row = ledger.fail(job["id"], claim.token, code="io_error", message="EIO", stderr_tail="tail",
                          retryable=retryable)
    assert len(sent) == 1
    assert (row["status"], row["stderr_tail"]) == ("queued" if retryable else "failed", "tail")
    assert listener() == [f"{job['id']}:status"]
    with statements(engine) as sent, pytest.raises(FencedOut):
        ledger.fail(job["id"], claim.token, code="io_error", message="EIO")
    assert len(sent) == 1 and listener() == []


def test_recording_a_cancel_and_a_progress_heartbeat_are_one_statement_each(engine, ledger, tenant, listener):
    job = new_job(ledger, tenant)
    claim = ledger.claim(job["id"], "w")
    listener()
    with statements(engine) as sent:
        ledger.heartbeat(job["id"], claim.token, {"percent": 10.0})
    assert len(sent) == 1 and listener() == [f"{job['id']}:progress"]
    with statements(engine) as sent:
        ledger.heartbeat(job["id"], claim.token)
    assert len(sent) == 1 and listener() == []  # a bare heartbeat wakes nobody
    ledger.request_cancel(job["id"], tenant.id)
    listener()
    with statements(engine) as sent:
        ledger.record_cancelled(job["id"], claim.token)
    assert len(sent) == 1 and listener() == [f"{job['id']}:status"]


def test_a_reaper_round_is_one_statement_for_every_stale_job(engine, ledger, tenant, clean_ledger, listener):
    jobs = [new_job(ledger, tenant, max_attempts=max_attempts) for max_attempts in (1, 3, 3)]
    for job in jobs:
        ledger.claim(job["id"], "w")
        backdate(engine, job["id"], heartbeat_at=120)
    ledger.request_cancel(jobs[2]["id"], tenant.id)
    listener()
    with engine.begin() as conn, statements(engine) as sent:
        decisions = ledger.reap_stale(conn, 60)
    assert len(sent) == 1
    assert sorted(d["status"] for d in decisions) == ["cancelled", "failed", "queued"]
    assert sorted(listener()) == sorted(f"{job['id']}:status" for job in jobs)
    for job in jobs:
        assert ledger.events(job["id"])[-1]["actor"] == "reaper"


def test_stale_has_one_definition_that_the_reaper_metrics_and_report_share(engine, ledger, tenant, clean_ledger):
    ages = {"fresh": 59, "stale": 61}
    ids = {}
    for name, age in ages.items():
        ids[name] = new_job(ledger, tenant)["id"]
        ledger.claim(ids[name], "w")
        backdate(engine, ids[name], heartbeat_at=age)
    with engine.begin() as conn:
        reaper = {d["id"] for d in ledger.reap_stale(conn, 60, dry_run=True)}
        conn.execute(text("SELECT set_config('ffworker.stale_after_s', '60', true)"))
        report = set(conn.execute(text("SELECT job_id FROM report_stuck_jobs")).scalars())
    body, _ = Metrics(engine, 60).render()
    (stuck,) = [sample.value for family in text_string_to_metric_families(body.decode())
                for sample in family.samples if sample.name == "ffworker_jobs_stuck" and sample.labels["kind"] == "probe"]
    assert reaper == report == {ids["stale"]} and stuck == 1


# -- retry and bulk actions (the dashboard, POST /v1/jobs/{id}/retry) ------------------------


def failed_job(ledger, tenant) -> dict:
    job = new_job(ledger, tenant, max_attempts=1)
    ledger.fail(job["id"], ledger.claim(job["id"], "w").token, code="invalid_input", message="not media")
    return job


def test_a_retry_is_one_statement_with_its_api_event_and_notice(engine, ledger, tenant, other_tenant, listener):
    failed = failed_job(ledger, tenant)
    listener()
    with statements(engine) as sent:
        row = ledger.retry(failed["id"], tenant.id, 3)
    assert len(sent) == 1
    # The same job; attempts keeps counting (the fencing token), the allowance is fresh.
    assert (row["id"], row["status"], row["attempts"], row["max_attempts"]) == (failed["id"], "queued", 1, 4)
    assert row["tenant_name"] == "acme" and row["finished_at"] is None and row["run_after"] is not None
    last = ledger.events(failed["id"])[-1]
    assert (last["from_status"], last["to_status"], last["attempt"], last["worker"], last["reason"], last["actor"]) \
        == ("failed", "queued", 1, None, "retried by request", "api")
    assert listener() == [f"{failed['id']}:status"]

    cancelled = new_job(ledger, tenant)
    ledger.request_cancel(cancelled["id"], tenant.id)
    assert ledger.retry(cancelled["id"], None, 3)["status"] == "queued"  # None: an operator, any tenant
    assert [(e["from_status"], e["to_status"], e["actor"]) for e in ledger.events(cancelled["id"])][-1] \
        == ("cancelled", "queued", "api")


def test_a_refused_retry_reads_once_to_say_why_and_changes_nothing(engine, ledger, tenant, other_tenant, listener):
    queued = new_job(ledger, tenant)
    theirs = failed_job(ledger, other_tenant)
    listener()
    with statements(engine) as sent, pytest.raises(NotRetryable):
        ledger.retry(queued["id"], tenant.id, 3)
    assert len(sent) == 2
    with pytest.raises(JobNotFound):
        ledger.retry(theirs["id"], tenant.id, 3)
    assert ledger.get(theirs["id"])["status"] == "failed" and listener() == []


def test_bulk_retry_and_cancel_are_one_statement_per_batch_each_row_audited_as_the_api(
        engine, ledger, tenant, other_tenant, clean_ledger, listener):
    failed = [failed_job(ledger, tenant) for _ in range(3)]
    theirs = failed_job(ledger, other_tenant)
    listener()
    with statements(engine) as sent:
        ids = ledger.retry_matching({"tenant_id": tenant.id}, 2, batch=2)
    assert len(sent) == 2  # a full batch of 2, then the last one
    assert sorted(map(str, ids)) == sorted(str(j["id"]) for j in failed)
    assert sorted(listener()) == sorted(f"{j['id']}:status" for j in failed)
    for job in failed:
        row, last = ledger.get(job["id"]), ledger.events(job["id"])[-1]
        assert (row["status"], row["attempts"], row["max_attempts"]) == ("queued", 1, 3)
        assert (last["from_status"], last["to_status"], last["reason"], last["actor"]) \
            == ("failed", "queued", "retried by request", "api")
    assert ledger.get(theirs["id"])["status"] == "failed"

    running = new_job(ledger, tenant)
    ledger.claim(running["id"], "w")
    listener()
    with statements(engine) as sent:
        ids = ledger.cancel_matching({"tenant_id": tenant.id})
    assert len(sent) == 1
    assert sorted(map(str, ids)) == sorted(str(j["id"]) for j in [*failed, running])
    assert sorted(listener()) == sorted(f"{j['id']}:status" for j in [*failed, running])
    for job in failed:
        last = ledger.events(job["id"])[-1]
        assert (last["from_status"], last["to_status"], last["reason"], last["actor"]) \
            == ("queued", "cancelled", "cancelled by request", "api")
    flagged = ledger.get(running["id"])
    assert flagged["status"] == "running" and flagged["cancel_requested_at"] is not None
    assert ledger.events(running["id"])[-1]["to_status"] == "running"  # a request, not a transition
    assert ledger.cancel_matching({"tenant_id": tenant.id}) == []  # the flagged job is not asked twice
