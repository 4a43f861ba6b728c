"""Who made each transition (``job_events.actor``, migration 0006): every transition
statement sets it, the metrics trigger counts the reaper's by it, and the migration
fills it in for the rows written before it."""
from __future__ import annotations

import uuid

import pytest
from sqlalchemy import text

from tests.helpers import scratch_database
from tests.integration.test_ledger import backdate, new_job

pytestmark = pytest.mark.integration


def actors(ledger, job_id) -> list[tuple]:
    return [(e["from_status"], e["to_status"], e["actor"]) for e in ledger.events(job_id)]


def by_reaper(engine) -> dict[tuple, bool]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT from_status, to_status, by_reaper, transitions FROM job_transition_totals "
                                 "WHERE from_status = 'running'")).all()
    return {(r.from_status, r.to_status, r.by_reaper): r.transitions for r in rows}


def test_every_transition_names_its_actor(engine, ledger, tenant, clean_ledger):
    done = new_job(ledger, tenant)
    ledger.complete(done["id"], ledger.claim(done["id"], "w").token, {})
    assert actors(ledger, done["id"]) == [
        (None, "queued", "api"), ("queued", "running", "worker"), ("running", "completed", "worker")]

    retried = new_job(ledger, tenant, max_attempts=1)
    ledger.fail(retried["id"], ledger.claim(retried["id"], "w").token, code="io_error", message="EIO",
                retryable=True)
    assert actors(ledger, retried["id"])[-1] == ("running", "failed", "worker")

    queued = new_job(ledger, tenant)
    ledger.request_cancel(queued["id"], tenant.id)
    assert actors(ledger, queued["id"])[-1] == ("queued", "cancelled", "api")

    running = new_job(ledger, tenant)
    claim = ledger.claim(running["id"], "w")
    ledger.request_cancel(running["id"], tenant.id)  # only a flag: no event
    assert actors(ledger, running["id"])[-1] == ("queued", "running", "worker")
    ledger.record_cancelled(running["id"], claim.token)
    assert actors(ledger, running["id"])[-1] == ("running", "cancelled", "worker")


def test_the_reaper_marks_its_transitions_and_the_metrics_count_them_by_the_marker(
        engine, ledger, tenant, clean_ledger):
    stale = new_job(ledger, tenant)
    ledger.claim(stale["id"], "w")
    backdate(engine, stale["id"], heartbeat_at=3600)
    with engine.begin() as conn:
        (decision,) = ledger.reap_stale(conn, 60)
    assert decision["status"] == "queued"
    assert actors(ledger, stale["id"])[-1] == ("running", "queued", "reaper")
    # A worker's own failure whose message happens to read like the reaper's is the worker's.
    lookalike = new_job(ledger, tenant)
    ledger.fail(lookalike["id"], ledger.claim(lookalike["id"], "w").token, code="stale", message="input went away",
                retryable=True)
    assert ledger.events(lookalike["id"])[-1]["reason"].startswith("stale:")
    assert by_reaper(engine) == {("running", "queued", True): 1, ("running", "queued", False): 1}


def test_an_event_without_an_actor_is_refused(engine, ledger, tenant, clean_ledger):
    job = new_job(ledger, tenant)
    with pytest.raises(Exception, match="actor"), engine.begin() as conn:
        conn.execute(text("INSERT INTO job_events (job_id, to_status, attempt) VALUES (:id, 'queued', 0)"),
                     {"id": job["id"]})
    with pytest.raises(Exception, match="actor_valid"), engine.begin() as conn:
        conn.execute(text("INSERT INTO job_events (job_id, to_status, attempt, actor) VALUES (:id, 'queued', 0, 'x')"),
                     {"id": job["id"]})


# -- migration 0006 -----------------------------------------------------------------------


def seed_events(conn, tenant, events) -> None:
    """One running job per (from, to, reason) event, as versions before 0006 wrote them."""
    for source, target, reason in events:
        job = uuid.uuid4()
        conn.execute(text("""
            INSERT INTO jobs (id, tenant_id, kind, status, spec, max_attempts, timeout_s, attempts, started_at)
            VALUES (:id, :t, 'probe', :s, '{}', 3, 60, 1, now() - interval '5 s')
        """), {"id": job, "t": tenant, "s": target})
        conn.execute(text("INSERT INTO job_events (job_id, from_status, to_status, attempt, reason) "
                          "VALUES (:id, :f, :s, 1, :r)"), {"id": job, "f": source, "s": target, "r": reason})


def test_migration_0006_fills_in_the_actor_from_the_old_reasons_and_downgrades(settings):
    from alembic import command

    from ffworker.cli import alembic_config

    with scratch_database(settings) as (url, engine):
        command.upgrade(alembic_config(url), "0005")
        with engine.begin() as conn:
            tenant = conn.execute(text("INSERT INTO tenants (name) VALUES ('old') RETURNING id")).scalar_one()
            seed_events(conn, tenant, [
                (None, "queued", "submitted"), ("queued", "running", "claimed"),
                ("queued", "cancelled", "cancelled by request"), ("running", "failed", "stale: no heartbeat for 90 s"),
                ("running", "queued", "io_error: EIO"), ("running", "cancelled", "cancel requested"),
            ])
        command.upgrade(alembic_config(url), "head")
        with engine.connect() as conn:
            filled = conn.execute(text("SELECT reason, actor FROM job_events ORDER BY id")).all()
            totals = conn.execute(text("SELECT to_status, by_reaper FROM job_transition_totals "
                                       "WHERE from_status = 'running' ORDER BY to_status")).all()
        assert [tuple(r) for r in filled] == [
            ("submitted", "api"), ("claimed", "worker"), ("cancelled by request", "api"),
            ("stale: no heartbeat for 90 s", "reaper"), ("io_error: EIO", "worker"), ("cancel requested", "worker"),
        ]
        assert [tuple(r) for r in totals] == [("cancelled", False), ("failed", True), ("queued", False)]

        with engine.begin() as conn:  # after 0006 the marker decides, not the text
            conn.execute(text("INSERT INTO job_events (job_id, from_status, to_status, attempt, reason, actor) "
                              "SELECT job_id, 'running', 'queued', 1, 'stale: by hand', 'worker' FROM job_events "
                              "WHERE reason = 'io_error: EIO'"))
            conn.execute(text("INSERT INTO job_events (job_id, from_status, to_status, attempt, reason, actor) "
                              "SELECT job_id, 'running', 'cancelled', 1, 'any text', 'reaper' FROM job_events "
                              "WHERE reason = 'io_error: EIO'"))
            counted = conn.execute(text("SELECT to_status, by_reaper, transitions FROM job_transition_totals "
                                        "WHERE from_status = 'running' ORDER BY to_status, by_reaper")).all()
        assert [tuple(r) for r in counted] == [
            ("cancelled", False, 1), ("cancelled", True, 1), ("failed", True, 1), ("queued", False, 2)]

        command.downgrade(alembic_config(url), "0005")
        with engine.connect() as conn:
            columns = conn.execute(text("SELECT column_name FROM information_schema.columns "
                                        "WHERE table_name = 'job_events'")).scalars().all()
            function = conn.execute(text("SELECT count(*) FROM pg_proc WHERE proname = 'ffworker_is_stale'")).scalar()
            stuck = conn.execute(text("SELECT count(*) FROM report_stuck_jobs")).scalar()
        assert "actor" not in columns and function == 0 and stuck == 0
