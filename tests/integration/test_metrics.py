"""``GET /metrics``: numbers derived from the ledger, exact for a seeded history, parsed
by prometheus-client's own parser, and monotonic across retention pruning."""
from __future__ import annotations

import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from ffworker.maintenance import prune
from ffworker.metrics import Metrics
from tests.helpers import scratch_database

pytestmark = pytest.mark.integration


def scrape(client) -> dict:
    """{(sample name, ((label, value), ...)): value} of one scrape."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def new_job(ledger, tenant, kind="transcode", workspace="default"):
    job, _ = ledger.create(tenant_id=tenant.id, kind=kind, spec={"input": "a.mp4"}, workspace=workspace,
                           priority=0, metadata={}, max_attempts=3, timeout_s=60)
    return job["id"]


def backdate(engine, job_id, column: str, seconds: float) -> None:
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE jobs SET {column} = now() - make_interval(secs => :s) WHERE id = :id"),
                     {"s": seconds, "id": job_id})


@pytest.fixture
def history(engine, ledger, tenant, other_tenant, settings):
    """A known history: one of each ending, a retry, a reap, a stuck job, queued work."""
    # completed after a 42 s run at 3x, 10 s of media, in workspace "campaign"
    done = new_job(ledger, tenant, workspace="campaign")
    backdate(engine, done, "run_after", 7.0)  # due 7 s before its claim
    token = ledger.claim(done, "w").token
    ledger.heartbeat(done, token, {"percent": 50.0, "speed": 3.0}, media_duration_s=10.0)
    backdate(engine, done, "started_at", 42.0)
    ledger.complete(done, token, {"outputs": []})
    # a probe that fails at once
    broken = new_job(ledger, tenant, kind="probe")
    ledger.fail(broken, ledger.claim(broken, "w").token, code="invalid_input", message="unreadable")
    # a transcode retried by its worker, then reaped (attempts left: queued again)
    flaky = new_job(ledger, tenant)
    ledger.fail(flaky, ledger.claim(flaky, "w").token, code="io_error", message="EIO", retryable=True)
    backdate(engine, flaky, "run_after", 0)
    ledger.claim(flaky, "w")
    backdate(engine, flaky, "heartbeat_at", settings.stale_after_s + 30)
    with engine.begin() as conn:
        assert len(ledger.reap_stale(conn, settings.stale_after_s)) == 1
    # cancelled while queued; still queued; another tenant's; a stuck running probe
    ledger.request_cancel(new_job(ledger, tenant), tenant.id)
    new_job(ledger, tenant)
    new_job(ledger, other_tenant, kind="probe")
    stuck = new_job(ledger, other_tenant, kind="probe")
    ledger.claim(stuck, "w")
    backdate(engine, stuck, "heartbeat_at", settings.stale_after_s + 5)
    return {"done": done, "stuck": stuck}


def test_metrics_of_a_known_history(client, history):
    samples = scrape(client)
    acme, globex = "acme", "globex"

    assert value(samples, "ffworker_ledger_up") == 1
    created = {labels: v for (name, labels), v in samples.items() if name == "ffworker_jobs_created_total"}
    assert created == {
        (("kind", "transcode"), ("tenant", acme), ("workspace", "campaign")): 1,
        (("kind", "probe"), ("tenant", acme), ("workspace", "default")): 1,
        (("kind", "transcode"), ("tenant", acme), ("workspace", "default")): 3,
        (("kind", "probe"), ("tenant", globex), ("workspace", "default")): 2,
    }
    finished = {labels: v for (name, labels), v in samples.items() if name == "ffworker_jobs_finished_total"}
    assert finished == {
        (("kind", "transcode"), ("status", "completed"), ("tenant", acme), ("workspace", "campaign")): 1,
        (("kind", "probe"), ("status", "failed"), ("tenant", acme), ("workspace", "default")): 1,
        (("kind", "transcode"), ("status", "cancelled"), ("tenant", acme), ("workspace", "default")): 1,
    }
    assert value(samples, "ffworker_job_retries_total", kind="transcode") == 2  # the worker's and the reaper's
    assert value(samples, "ffworker_reaper_actions_total", kind="transcode", action="requeued", reason="stale") == 1
    assert value(samples, "ffworker_media_processed_seconds_total", tenant=acme, kind="transcode") == 10.0

    # queue wait: one observation per claim; the completed job waited 7 s
    assert value(samples, "ffworker_job_queue_wait_seconds_count", kind="transcode") == 3
    assert value(samples, "ffworker_job_queue_wait_seconds_count", kind="probe") == 2
    assert value(samples, "ffworker_job_queue_wait_seconds_bucket", kind="transcode", le="5.0") == 2
    assert value(samples, "ffworker_job_queue_wait_seconds_bucket", kind="transcode", le="10.0") == 3
    # run time: one observation per ended run, by outcome; the completed run took 42 s
    assert value(samples, "ffworker_job_run_seconds_count", kind="transcode", outcome="completed") == 1
    assert value(samples, "ffworker_job_run_seconds_bucket", kind="transcode", outcome="completed", le="30.0") == 0
    assert value(samples, "ffworker_job_run_seconds_bucket", kind="transcode", outcome="completed", le="60.0") == 1
    assert value(samples, "ffworker_job_run_seconds_sum", kind="transcode", outcome="completed") == \
        pytest.approx(42.0, abs=1.0)
    assert value(samples, "ffworker_job_run_seconds_count", kind="transcode", outcome="retried") == 2
    assert value(samples, "ffworker_job_run_seconds_count", kind="probe", outcome="failed") == 1
    assert value(samples, "ffworker_job_run_seconds_bucket", kind="probe", outcome="failed", le="+Inf") == 1
    # ffmpeg speed of completed runs
    assert value(samples, "ffworker_ffmpeg_speed_ratio_count", kind="transcode") == 1
    assert value(samples, "ffworker_ffmpeg_speed_ratio_sum", kind="transcode") == 3.0
    assert value(samples, "ffworker_ffmpeg_speed_ratio_bucket", kind="transcode", le="2.0") == 0
    assert value(samples, "ffworker_ffmpeg_speed_ratio_bucket", kind="transcode", le="4.0") == 1

    # right now: queued (the reaped job and the waiting one; another tenant's probe), running, stuck
    assert value(samples, "ffworker_jobs_queued", kind="transcode") == 2
    assert value(samples, "ffworker_jobs_queued", kind="probe") == 1
    assert value(samples, "ffworker_jobs_running", kind="probe") == 1
    assert value(samples, "ffworker_jobs_stuck", kind="probe") == 1
    assert value(samples, "ffworker_jobs_running", kind="thumbnail") == 0  # every kind, even when idle
    assert ("ffworker_jobs_running", (("kind", "thumbnail"),)) in samples
    assert value(samples, "ffworker_queue_oldest_due_seconds") >= 0


def test_counters_never_go_back_when_old_jobs_are_pruned(client, engine, ledger, history):
    before = scrape(client)
    with engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET finished_at = now() - interval '40 days' WHERE finished_at IS NOT NULL"))
    assert ledger.prune(30, batch=prune.BATCH) == 3
    after = scrape(client)
    for (name, labels), number in before.items():
        if name.endswith(("_total", "_bucket", "_count", "_sum")):
            assert after.get((name, labels)) == number, (name, labels)


def test_metrics_need_no_key_and_offer_openmetrics_when_asked(client, history):
    response = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.status_code == 200
    assert response.content_type.startswith("application/openmetrics-text")
    assert response.get_data(as_text=True).rstrip().endswith("# EOF")


def test_an_unreachable_ledger_is_reported_as_down_not_as_an_error():
    engine = create_engine(make_url("postgresql+psycopg://nobody@127.0.0.1:9/none"),
                           connect_args={"connect_timeout": 2})
    body, _ = Metrics(engine, 60).render()
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert families["ffworker_ledger_up"].samples[0].value == 0
    assert "ffworker_jobs_created" not in families


def test_migration_counts_the_history_already_in_the_ledger(settings):
    """0002 folds the existing job_events into job_transition_totals, and downgrades cleanly."""
    from alembic import command

    from ffworker.cli import alembic_config

    with scratch_database(settings, "m") as (url, engine):
        command.upgrade(alembic_config(url), "0001")
        with engine.begin() as conn:
            tenant = conn.execute(text("INSERT INTO tenants (name) VALUES ('old') RETURNING id")).scalar_one()
            for n, final in enumerate(("completed", "failed")):
                job = uuid.uuid4()
                conn.execute(text("""
                    INSERT INTO jobs (id, tenant_id, kind, status, spec, max_attempts, timeout_s, attempts,
                                      created_at, run_after, started_at, finished_at, media_duration_s)
                    VALUES (:id, :t, 'transcode', :s, '{}', 3, 60, 1, now() - interval '100 s',
                            now() - interval '100 s', now() - interval '90 s', now() - interval '30 s', 5)
                """), {"id": job, "t": tenant, "s": final})
                conn.execute(text("""
                    INSERT INTO job_events (job_id, at, from_status, to_status, attempt, reason) VALUES
                      (:id, now() - interval '100 s', NULL, 'queued', 0, 'submitted'),
                      (:id, now() - interval '90 s', 'queued', 'running', 1, 'claimed'),
                      (:id, now() - interval '30 s', 'running', :s, 1, :s)
                """), {"id": job, "s": final})
        command.upgrade(alembic_config(url), "head")
        with engine.connect() as conn:
            rows = conn.execute(text("""
                SELECT from_status, to_status, transitions, seconds_count, round(seconds_sum) AS seconds,
                       media_seconds
                  FROM job_transition_totals ORDER BY from_status NULLS FIRST, to_status
            """)).all()
        assert [tuple(r) for r in rows] == [
            (None, "queued", 2, 0, 0, 0.0),
            ("queued", "running", 2, 2, 20, 0.0),      # due at -100 s, claimed at -90 s
            ("running", "completed", 1, 1, 60, 5.0),   # claimed at -90 s, ended at -30 s
            ("running", "failed", 1, 1, 60, 0.0),
        ]
        command.downgrade(alembic_config(url), "0001")
        with engine.connect() as conn:
            left = conn.execute(text("""
                SELECT count(*) FROM pg_class WHERE relname IN
                  ('job_transition_totals', 'report_daily_jobs', 'report_monthly_usage', 'report_stuck_jobs')
            """)).scalar_one()
            functions = conn.execute(text("SELECT count(*) FROM pg_proc WHERE proname LIKE 'ffworker_%'")).scalar_one()
        assert (left, functions) == (0, 0)
