"""The reporting views and docs/ledger.md against a seeded ledger with known timestamps.

Every job below is written with explicit timestamps (in 2001, so the real clock
never reaches into them); the expected aggregates are worked out by hand. The
example queries of docs/ledger.md run exactly as printed, on a connection whose
now() is frozen at FROZEN_NOW, and must give exactly the rows listed here.
"""
from __future__ import annotations

import json
import re
import uuid
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

pytestmark = pytest.mark.integration

DOC = Path(__file__).resolve().parents[2] / "docs" / "ledger.md"
UTC = timezone.utc
FROZEN_NOW = datetime(2001, 3, 4, 12, 0, tzinfo=UTC)
D0, D1, D2 = date(2001, 2, 27), date(2001, 3, 2), date(2001, 3, 3)


def at(day: date, hour: int, minute: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, hour, minute, tzinfo=UTC)


def seed_job(conn, tenant_id, created: datetime, *, kind="transcode", runs=(), cancelled_after=None,
             media=None, preset=None, output_bytes=None, workspace="default") -> uuid.UUID:
    """A job and its audit trail. ``runs``: (claim s, end s or None, to status, reason) after ``created``."""
    job_id = uuid.uuid4()
    events = [(created, None, "queued", 0, "submitted")]
    run_after = created
    for number, (claim_s, end_s, outcome, reason) in enumerate(runs, start=1):
        due = run_after
        events.append((created + timedelta(seconds=claim_s), "queued", "running", number, "claimed"))
        if end_s is not None:
            end = created + timedelta(seconds=end_s)
            events.append((end, "running", outcome, number, reason or outcome))
            if outcome == "queued":
                run_after = end
    if cancelled_after is not None:
        events.append((created + timedelta(seconds=cancelled_after), "queued", "cancelled", len(runs),
                       "cancelled by request"))
    status = events[-1][2]
    claims = [e[0] for e in events if e[2] == "running"]
    terminal = status in ("completed", "failed", "cancelled")
    error = events[-1][4] if status == "failed" else None
    spec = {"input": "in.mp4", **({"output": "out.mp4"} if kind != "probe" else {}),
            **({"preset": preset} if preset else {})}
    result = None
    if status == "completed":
        result = {"outputs": [{"path": "out.mp4", "size_bytes": output_bytes}]} if output_bytes else {"media": {}}
    conn.execute(text("""
        INSERT INTO jobs (id, tenant_id, kind, status, workspace, spec, max_attempts, timeout_s, attempts, worker,
                          created_at, updated_at, run_after, started_at, heartbeat_at, finished_at,
                          progress_at, progress_speed, media_duration_s, result, error_code, error_message)
        VALUES (:id, :tenant, :kind, :status, :workspace, CAST(:spec AS jsonb), 3, 600, :attempts, :worker,
                :created, :updated, :run_after, :started, :heartbeat, :finished,
                :progress_at, :speed, :media, CAST(:result AS jsonb), :error_code, :error_message)
    """), {
        "id": job_id, "tenant": tenant_id, "kind": kind, "status": status, "workspace": workspace,
        "spec": json.dumps(spec), "attempts": len(runs), "worker": "host-a:101" if runs else None,
        "created": created, "updated": events[-1][0], "run_after": run_after if status != "queued" else created,
        "started": claims[-1] if claims else None, "heartbeat": events[-1][0] if runs else None,
        "finished": events[-1][0] if terminal else None,
        "progress_at": events[-1][0] if status == "completed" else None,
        "speed": 2.0 if status == "completed" else None, "media": media,
        "result": json.dumps(result) if result is not None else None,
        "error_code": error.split(":")[0] if error else ("cancelled" if status == "cancelled" else None),
        "error_message": error.split(": ", 1)[1] if error else None,
    })
    for moment, source, target, attempt, reason in events:
        conn.execute(text("""
            INSERT INTO job_events (job_id, at, from_status, to_status, attempt, worker, reason, actor)
            VALUES (:job, :at, :source, :target, :attempt, :worker, :reason, :actor)
        """), {"job": job_id, "at": moment, "source": source, "target": target, "attempt": attempt,
               "worker": "host-a:101" if attempt else None, "reason": reason,
               "actor": "api" if source is None or (source, target) == ("queued", "cancelled") else "worker"})
    return job_id


@pytest.fixture
def seeded(engine, tenant, other_tenant):
    """acme ("tenant") and globex ("other_tenant"), jobs on D0 (February), D1 and D2 (March 2001)."""
    with engine.begin() as conn:
        acme, globex = tenant.id, other_tenant.id
        ids = {
            "J1": seed_job(conn, acme, at(D1, 10), runs=[(2, 12, "completed", None)], media=30,
                           preset="h264-720p", output_bytes=1000),
            "J2": seed_job(conn, acme, at(D1, 11), runs=[(4, 34, "completed", None)], media=60,
                           preset="h264-720p", output_bytes=3000),
            "J3": seed_job(conn, acme, at(D1, 12), runs=[(6, 26, "completed", None)], media=90,
                           preset="h264-360p", output_bytes=500),
            "J4": seed_job(conn, acme, at(D1, 13), preset="h264-720p", runs=[
                (1, 3, "queued", "io_error: EIO"),
                (10, 15, "failed", "ffmpeg_failed: ffmpeg exited with code 1: Invalid data")]),
            "J5": seed_job(conn, acme, at(D1, 14), kind="probe", runs=[(0.5, 1.5, "completed", None)], media=12),
            "J6": seed_job(conn, acme, at(D1, 15), cancelled_after=5),
            "J7": seed_job(conn, acme, at(D2, 8), runs=[(3, None, "running", None)], preset="h264-720p"),
            "J8": seed_job(conn, acme, at(D2, 9)),
            "J10": seed_job(conn, acme, at(D2, 10), kind="probe",
                            runs=[(1, 2, "failed", "invalid_input: cannot read the input")]),
            "J9": seed_job(conn, acme, at(D0, 10), runs=[(1, 11, "completed", None)], media=40,
                           preset="h264-1080p", output_bytes=2000),
            "K1": seed_job(conn, globex, at(D1, 9), kind="thumbnail", runs=[(1, 2, "completed", None)], media=8,
                           output_bytes=100),
        }
    return ids


def plain_rows(result) -> list[tuple]:
    return [tuple(float(v) if isinstance(v, Decimal) else v for v in row) for row in result]


def assert_rows(actual: list[tuple], expected: list[tuple]) -> None:
    assert len(actual) == len(expected), f"{actual} != {expected}"
    for got, want in zip(actual, expected):
        assert len(got) == len(want), (got, want)
        for g, w in zip(got, want):
            if isinstance(w, float):
                assert g == pytest.approx(w, abs=1e-9), (got, want)
            else:
                assert g == w, (got, want)


# -- the views ------------------------------------------------------------------------


def test_daily_counts_with_queue_wait_and_run_time_percentiles(engine, seeded):
    with engine.connect() as conn:
        rows = plain_rows(conn.execute(text(
            "SELECT * FROM report_daily_jobs ORDER BY day, tenant, kind, status")))
    # day, tenant, kind, status, jobs, retried, wait p50, wait p95, run p50, run p95, media seconds
    assert_rows(rows, [
        (D0, "acme", "transcode", "completed", 1, 0, 1.0, 1.0, 10.0, 10.0, 40.0),
        (D1, "acme", "probe", "completed", 1, 0, 0.5, 0.5, 1.0, 1.0, 12.0),
        (D1, "acme", "transcode", "cancelled", 1, 0, None, None, None, None, 0.0),
        # waits 2, 4, 6 s and runs 10, 30, 20 s: interpolated percentiles
        (D1, "acme", "transcode", "completed", 3, 0, 4.0, 5.8, 20.0, 29.0, 180.0),
        # first claim after 1 s; the final run (the second) took 5 s
        (D1, "acme", "transcode", "failed", 1, 1, 1.0, 1.0, 5.0, 5.0, 0.0),
        (D1, "globex", "thumbnail", "completed", 1, 0, 1.0, 1.0, 1.0, 1.0, 8.0),
        (D2, "acme", "probe", "failed", 1, 0, 1.0, 1.0, 1.0, 1.0, 0.0),
        (D2, "acme", "transcode", "queued", 1, 0, None, None, None, None, 0.0),
        (D2, "acme", "transcode", "running", 1, 0, 3.0, 3.0, None, None, 0.0),
    ])


def test_monthly_usage_per_tenant(engine, seeded):
    with engine.connect() as conn:
        rows = plain_rows(conn.execute(text("SELECT * FROM report_monthly_usage ORDER BY month, tenant")))
    # month, tenant, submitted, completed, failed, cancelled, unfinished, runs, media s, worker s, output bytes
    assert_rows(rows, [
        (date(2001, 2, 1), "acme", 1, 1, 0, 0, 0, 1, 40.0, 10.0, 2000),
        # worker seconds: 10 + 30 + 20 + (2 + 5, both runs of J4) + 1 + 1; J7 still runs
        (date(2001, 3, 1), "acme", 9, 4, 2, 1, 2, 8, 192.0, 69.0, 4500),
        (date(2001, 3, 1), "globex", 1, 1, 0, 0, 0, 1, 8.0, 1.0, 100),
    ])


def test_stuck_jobs_follow_the_session_threshold(engine, ledger, tenant):
    def running(silent_s: float, *, cancel=False, last_attempt=False):
        job, _ = ledger.create(tenant_id=tenant.id, kind="probe", spec={"input": "a.mp4"}, workspace="w",
                               priority=0, metadata={}, max_attempts=1 if last_attempt else 3, timeout_s=60)
        ledger.claim(job["id"], "host-b:7")
        with engine.begin() as conn:
            conn.execute(text("""
                UPDATE jobs SET heartbeat_at = now() - make_interval(secs => :s),
                                cancel_requested_at = CASE WHEN :cancel THEN now() END WHERE id = :id
            """), {"s": silent_s, "cancel": cancel, "id": job["id"]})
        return job["id"]

    quiet, cancelled, exhausted, fresh = running(120), running(90, cancel=True), running(75, last_attempt=True), \
        running(30)

    def stuck(threshold=None):
        with engine.begin() as conn:
            if threshold is not None:
                conn.execute(text("SELECT set_config('ffworker.stale_after_s', :v, true)"), {"v": str(threshold)})
            return conn.execute(text(
                "SELECT job_id, reaper_outcome, worker, stale_after_s, round(silent_for_s) AS silent "
                "FROM report_stuck_jobs ORDER BY silent_for_s DESC")).all()

    assert [tuple(r) for r in stuck()] == [  # unset: 60 s
        (quiet, "queued", "host-b:7", 60.0, 120), (cancelled, "cancelled", "host-b:7", 60.0, 90),
        (exhausted, "failed", "host-b:7", 60.0, 75),
    ]
    assert [r.job_id for r in stuck(10)] == [quiet, cancelled, exhausted, fresh]
    assert stuck(300) == []


# -- docs/ledger.md ---------------------------------------------------------------------


def doc_examples() -> dict[str, str]:
    blocks = re.findall(r"```sql\n-- example: (\w+)\n(.*?)```", DOC.read_text(), re.S)
    return {name: sql for name, sql in blocks}


EXPECTED = {
    "throughput_per_day": [
        (D0, "completed", 1, 40.0),
        (D1, "cancelled", 1, 0.0),
        (D1, "completed", 5, 200.0),
        (D1, "failed", 1, 0.0),
        (D2, "failed", 1, 0.0),
    ],
    "slowest_presets": [
        ("h264-720p", 2, 20.0, 29.0, 0.444),
        ("h264-360p", 1, 20.0, 20.0, 0.222),
        ("h264-1080p", 1, 10.0, 10.0, 0.25),
    ],
    "failure_reasons": [
        ("ffmpeg_failed", 1, 0, 1),
        ("invalid_input", 1, 0, 1),
        ("io_error", 1, 1, 0),
    ],
    "retry_rate": [
        ("probe", 2, 0, 0.0, 1.0),
        ("thumbnail", 1, 0, 0.0, 1.0),
        ("transcode", 6, 1, 16.7, 1.0),
    ],
    "tenant_usage": [
        ("acme", 9, 4, 3.2, 0.019, "4500 bytes"),
        ("globex", 1, 1, 0.1, 0.0, "100 bytes"),
    ],
    "queue_wait_per_day": [
        (D0, 1, 1.0),
        (D1, 7, 5.8),
        (D2, 3, 3.0),
    ],
    "stuck_jobs": lambda ids: [(ids["J7"], "acme", "transcode", 1, "host-a:101", "queued")],
    "all_time_submissions": [("acme", 10), ("globex", 1)],
}


@pytest.fixture
def frozen_now(settings):
    """Connections whose now() is FROZEN_NOW (PostgreSQL resolves it through search_path)."""
    setup = create_engine(settings.database_url)
    with setup.begin() as conn:
        conn.execute(text("CREATE SCHEMA IF NOT EXISTS report_clock"))
        conn.execute(text(
            "CREATE OR REPLACE FUNCTION report_clock.now() RETURNS timestamptz LANGUAGE sql "
            f"AS $$ SELECT timestamptz '{FROZEN_NOW.isoformat()}' $$"))
    frozen = create_engine(settings.database_url,
                           connect_args={"options": "-c search_path=report_clock,public,pg_catalog"})
    yield frozen
    frozen.dispose()
    with setup.begin() as conn:
        conn.execute(text("DROP SCHEMA report_clock CASCADE"))
    setup.dispose()


def test_every_example_query_of_the_docs_gives_the_expected_rows(frozen_now, seeded):
    examples = doc_examples()
    assert len(examples) >= 5
    assert set(examples) == set(EXPECTED), "every example in docs/ledger.md needs its expected rows here"
    with frozen_now.connect() as conn:
        assert conn.execute(text("SELECT now()")).scalar() == FROZEN_NOW
        for name, sql in examples.items():
            expected = EXPECTED[name]
            expected = expected(seeded) if callable(expected) else expected
            try:
                assert_rows(plain_rows(conn.execute(text(sql))), expected)
            except AssertionError as exc:
                raise AssertionError(f"example {name}: {exc}") from None


def test_the_docs_describe_every_column_of_every_table_and_view(engine):
    doc = DOC.read_text()
    sections = dict(re.findall(r"^### `(\w+)`\n(.*?)(?=^##)", doc + "\n##", re.S | re.M))
    with engine.connect() as conn:
        columns = conn.execute(text("""
            SELECT table_name, column_name FROM information_schema.columns
             WHERE table_schema = 'public' ORDER BY table_name, ordinal_position
        """)).all()
    missing = [f"{table}.{column}" for table, column in columns
               if f"| `{column}` |" not in sections.get(table, "")]
    assert not missing, f"undocumented in docs/ledger.md: {missing}"
    assert {"report_daily_jobs", "report_monthly_usage", "report_stuck_jobs", "job_transition_totals"} <= set(sections)
