"""The ledger's guarantees on a real PostgreSQL: transitions, fencing, races, clock."""
from __future__ import annotations

import threading
import uuid

import pytest
from sqlalchemy import create_engine, text

from ffworker.errors import AlreadyTerminal, FencedOut, JobNotFound, NotClaimable
from ffworker.ledger import IdempotencyConflict, Ledger


def new_job(ledger: Ledger, tenant, **overrides):
    values = dict(
        tenant_id=tenant.id, kind="probe", spec={"input": "a.mp4"}, workspace="default", priority=0,
        metadata={}, max_attempts=3, timeout_s=60,
    )
    values.update(overrides)
    job, created = ledger.create(**values)
    assert created
    return job


def transitions(ledger: Ledger, job_id) -> list[tuple]:
    return [(e["from_status"], e["to_status"], e["attempt"]) for e in ledger.events(job_id)]


def status(ledger: Ledger, job_id) -> str:
    return ledger.get(job_id)["status"]


def backdate(engine, job_id, **columns) -> None:
    assignments = ", ".join(f"{column} = now() - make_interval(secs => :{column})" for column in columns)
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE jobs SET {assignments} WHERE id = :id"), {"id": job_id, **columns})


# -- allowed transitions ---------------------------------------------------------


def test_claim_and_complete(ledger, tenant):
    job = new_job(ledger, tenant)
    claim = ledger.claim(job["id"], "w1")
    assert claim.token == 1 and claim.job["status"] == "running" and claim.job["tenant_name"] == tenant.name
    done = ledger.complete(job["id"], claim.token, {"outputs": []})
    assert done["status"] == "completed" and done["finished_at"] is not None
    assert transitions(ledger, job["id"]) == [(None, "queued", 0), ("queued", "running", 1), ("running", "completed", 1)]


def test_deterministic_failure_fails_at_once(ledger, tenant):
    job = new_job(ledger, tenant)
    claim = ledger.claim(job["id"], "w1")
    row = ledger.fail(job["id"], claim.token, code="ffmpeg_failed", message="bad input", retryable=False)
    assert row["status"] == "failed" and row["error_code"] == "ffmpeg_failed"
    assert transitions(ledger, job["id"])[-1] == ("running", "failed", 1)


def test_transient_failure_requeues_with_backoff_until_attempts_run_out(engine, ledger, tenant):
    job = new_job(ledger, tenant, max_attempts=3)
    claim = ledger.claim(job["id"], "w1")
    row = ledger.fail(job["id"], claim.token, code="io_error", message="EIO", retryable=True)
    assert row["status"] == "queued"
    assert 2.5 <= (row["run_after"] - row["updated_at"]).total_seconds() <= 5.0  # 5 s after attempt 1, jittered
    with pytest.raises(NotClaimable):  # not due yet
        ledger.claim(job["id"], "w2")
    backdate(engine, job["id"], run_after=1)
    second = ledger.claim(job["id"], "w2")
    assert second.token == 2
    row = ledger.fail(job["id"], second.token, code="io_error", message="EIO", retryable=True)
    assert 5.0 <= (row["run_after"] - row["updated_at"]).total_seconds() <= 10.0  # doubled after attempt 2
    backdate(engine, job["id"], run_after=1)
    third = ledger.claim(job["id"], "w3")
    row = ledger.fail(job["id"], third.token, code="io_error", message="EIO", retryable=True)
    assert row["status"] == "failed"  # no attempts left
    assert [t[1] for t in transitions(ledger, job["id"])] == [
        "queued", "running", "queued", "running", "queued", "running", "failed"]
    assert ledger.events(job["id"])[-1]["reason"] == "io_error: EIO"


def test_cancel_queued_is_immediate(ledger, tenant):
    job = new_job(ledger, tenant)
    row = ledger.request_cancel(job["id"], tenant.id)
    assert row["status"] == "cancelled" and row["cancel_requested_at"] is not None
    assert transitions(ledger, job["id"])[-1] == ("queued", "cancelled", 0)
    with pytest.raises(NotClaimable):
        ledger.claim(job["id"], "w1")


def test_cancel_running_is_seen_at_the_next_heartbeat(ledger, tenant):
    job = new_job(ledger, tenant)
    claim = ledger.claim(job["id"], "w1")
    assert ledger.heartbeat(job["id"], claim.token).cancel_requested is False
    row = ledger.request_cancel(job["id"], tenant.id)
    assert row["status"] == "running"
    assert ledger.heartbeat(job["id"], claim.token).cancel_requested is True
    assert ledger.record_cancelled(job["id"], claim.token)["status"] == "cancelled"
    assert transitions(ledger, job["id"])[-1] == ("running", "cancelled", 1)


def test_progress_is_written_with_the_heartbeat(ledger, tenant):
    job = new_job(ledger, tenant)
    claim = ledger.claim(job["id"], "w1")
    assert ledger.get(job["id"])["progress_at"] is None
    ledger.heartbeat(job["id"], claim.token, {"percent": 42.5, "frame": 10, "fps": 25.0, "speed": 2.0,
                                              "out_time_s": 0.4, "eta_s": 1.2})
    row = ledger.get(job["id"])
    assert (row["progress_percent"], row["progress_frame"], row["progress_speed"]) == (42.5, 10, 2.0)
    assert row["progress_at"] is not None


# -- forbidden transitions --------------------------------------------------------


@pytest.mark.parametrize("terminal", ["completed", "failed", "cancelled"])
def test_terminal_states_never_change(ledger, tenant, terminal):
    job = new_job(ledger, tenant)
    claim = ledger.claim(job["id"], "w1")
    if terminal == "completed":
        ledger.complete(job["id"], claim.token, {})
    elif terminal == "failed":
        ledger.fail(job["id"], claim.token, code="x", message="x")
    else:
        ledger.request_cancel(job["id"], tenant.id)
        ledger.record_cancelled(job["id"], claim.token)
    before = ledger.get(job["id"])
    with pytest.raises(NotClaimable):
        ledger.claim(job["id"], "w2")
    with pytest.raises(AlreadyTerminal):
        ledger.request_cancel(job["id"], tenant.id)
    with pytest.raises(FencedOut):
        ledger.heartbeat(job["id"], claim.token, {"percent": 1.0})
    with pytest.raises(FencedOut):
        ledger.fail(job["id"], claim.token, code="x", message="x", retryable=True)
    with pytest.raises(FencedOut):
        ledger.record_cancelled(job["id"], claim.token)
    if terminal != "completed":
        with pytest.raises(FencedOut):
            ledger.complete(job["id"], claim.token, {})
    assert ledger.get(job["id"]) == before


def test_queued_job_cannot_be_completed_failed_or_heartbeaten(ledger, tenant):
    job = new_job(ledger, tenant)
    for write in (
        lambda: ledger.complete(job["id"], 0, {}),
        lambda: ledger.fail(job["id"], 0, code="x", message="x"),
        lambda: ledger.heartbeat(job["id"], 0),
        lambda: ledger.record_cancelled(job["id"], 0),
    ):
        with pytest.raises(FencedOut):
            write()
    assert status(ledger, job["id"]) == "queued"


def test_running_job_cannot_be_claimed_again(ledger, tenant):
    job = new_job(ledger, tenant)
    ledger.claim(job["id"], "w1")
    with pytest.raises(NotClaimable):
        ledger.claim(job["id"], "w2")


def test_record_cancelled_needs_a_cancel_request(ledger, tenant):
    job = new_job(ledger, tenant)
    claim = ledger.claim(job["id"], "w1")
    with pytest.raises(FencedOut):
        ledger.record_cancelled(job["id"], claim.token)
    assert status(ledger, job["id"]) == "running"


def test_cancel_of_another_tenants_job_is_not_found(ledger, tenant, other_tenant):
    job = new_job(ledger, tenant)
    with pytest.raises(JobNotFound):
        ledger.request_cancel(job["id"], other_tenant.id)
    with pytest.raises(JobNotFound):
        ledger.request_cancel(uuid.uuid4(), tenant.id)
    assert status(ledger, job["id"]) == "queued"


# -- fencing ----------------------------------------------------------------------


def test_stale_token_writes_nothing(engine, ledger, tenant):
    job = new_job(ledger, tenant)
    first = ledger.claim(job["id"], "w1")
    ledger.fail(job["id"], first.token, code="worker_lost", message="lost", retryable=True)
    backdate(engine, job["id"], run_after=1)  # skip the retry backoff
    second = ledger.claim(job["id"], "w2")
    assert second.token == first.token + 1
    before = ledger.get(job["id"])
    with pytest.raises(FencedOut):
        ledger.heartbeat(job["id"], first.token, {"percent": 99.0})
    with pytest.raises(FencedOut):
        ledger.complete(job["id"], first.token, {"outputs": ["zombie"]})
    with pytest.raises(FencedOut):
        ledger.fail(job["id"], first.token, code="x", message="x")
    assert ledger.get(job["id"]) == before
    done = ledger.complete(job["id"], second.token, {"outputs": []})
    assert done["result"] == {"outputs": []}


def test_completion_is_idempotent(ledger, tenant):
    job = new_job(ledger, tenant)
    claim = ledger.claim(job["id"], "w1")
    first = ledger.complete(job["id"], claim.token, {"outputs": [1]})
    again = ledger.complete(job["id"], claim.token, {"outputs": [2]})
    assert again["result"] == first["result"] == {"outputs": [1]}
    assert again["finished_at"] == first["finished_at"]
    completed_events = [t for t in transitions(ledger, job["id"]) if t[1] == "completed"]
    assert len(completed_events) == 1


# -- races ------------------------------------------------------------------------


def test_concurrent_claims_have_exactly_one_winner(ledger, tenant):
    job = new_job(ledger, tenant)
    contenders = 8
    barrier = threading.Barrier(contenders)
    outcomes: list[str] = []

    def contend(index: int) -> None:
        barrier.wait()
        try:
            ledger.claim(job["id"], f"w{index}")
            outcomes.append("won")
        except NotClaimable:
            outcomes.append("lost")

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["lost"] * (contenders - 1) + ["won"]
    assert ledger.get(job["id"])["attempts"] == 1
    assert [t for t in transitions(ledger, job["id"]) if t[1] == "running"] == [("queued", "running", 1)]


def test_cancel_racing_a_claim_leaves_one_consistent_outcome(ledger, tenant):
    for _ in range(10):
        job = new_job(ledger, tenant)
        barrier = threading.Barrier(2)
        claimed = []

        def claim() -> None:
            barrier.wait()
            try:
                claimed.append(ledger.claim(job["id"], "w1"))
            except NotClaimable:
                pass

        thread = threading.Thread(target=claim)
        thread.start()
        barrier.wait()
        row = ledger.request_cancel(job["id"], tenant.id)
        thread.join()
        final = ledger.get(job["id"])
        if claimed:  # the claim won: the run must see the cancel request
            assert final["status"] == "running" and final["cancel_requested_at"] is not None
            assert ledger.heartbeat(job["id"], claimed[0].token).cancel_requested
        else:
            assert row["status"] == final["status"] == "cancelled"


def test_idempotent_create_conflicts_on_a_different_request(ledger, tenant):
    job = new_job(ledger, tenant, idempotency_key="k1", request_sha256="a")
    same, created = ledger.create(
        tenant_id=tenant.id, kind="probe", spec={"input": "a.mp4"}, workspace="default", priority=0,
        metadata={}, max_attempts=3, timeout_s=60, idempotency_key="k1", request_sha256="a",
    )
    assert not created and same["id"] == job["id"]
    with pytest.raises(IdempotencyConflict):
        ledger.create(
            tenant_id=tenant.id, kind="probe", spec={"input": "b.mp4"}, workspace="default", priority=0,
            metadata={}, max_attempts=3, timeout_s=60, idempotency_key="k1", request_sha256="b",
        )


# -- the clock ----------------------------------------------------------------------


@pytest.fixture
def frozen_db_clock(settings):
    """A connection whose now() is a fixed instant far from any real clock.

    PostgreSQL resolves now() through search_path when pg_catalog is listed
    explicitly after another schema: the ledger's timestamps must follow it.
    """
    engine = create_engine(settings.database_url, connect_args={"options": "-c search_path=public"})
    with engine.begin() as conn:
        conn.execute(text("CREATE SCHEMA IF NOT EXISTS frozen_clock"))
        conn.execute(text(
            "CREATE OR REPLACE FUNCTION frozen_clock.now() RETURNS timestamptz "
            "LANGUAGE sql AS $$ SELECT timestamptz '2001-02-03 04:05:06+00' $$"
        ))
    engine.dispose()
    frozen = create_engine(
        settings.database_url, connect_args={"options": "-c search_path=frozen_clock,public,pg_catalog"}
    )
    yield Ledger(frozen)
    frozen.dispose()


def test_timestamps_come_from_the_database_clock(frozen_db_clock, ledger, engine, tenant):
    job = new_job(ledger, tenant)
    with engine.begin() as conn:  # due by the frozen clock too
        conn.execute(text("UPDATE jobs SET run_after = '2000-01-01' WHERE id = :id"), {"id": job["id"]})
    claim = frozen_db_clock.claim(job["id"], "w1")
    assert claim.job["started_at"].year == 2001
    assert claim.job["heartbeat_at"] == claim.job["started_at"]
    frozen_db_clock.heartbeat(job["id"], claim.token, {"percent": 5.0})
    done = frozen_db_clock.complete(job["id"], claim.token, {})
    assert done["finished_at"].isoformat() == "2001-02-03T04:05:06+00:00"
    assert done["progress_at"].year == 2001
