"""Beat's maintenance on a real PostgreSQL: reaper and its grace period, re-dispatch,
pruning and orphan cleanup. Time passes by backdating timestamps, never by sleeping."""
from __future__ import annotations

import os
import threading
import time

import pytest
from sqlalchemy import text

from ffworker import paths, s3
from ffworker.db import get_engine
from ffworker.ledger import Ledger, ProbeKey
from ffworker.maintenance import prune, reaper, redispatch
from ffworker.maintenance.prune import abort_orphaned_uploads, remove_orphaned_temp_files

from tests.integration.test_ledger import backdate, new_job, transitions

STALE = 60.0
GRACE = 120.0


def reap(ledger, **kwargs):
    return reaper.reap(ledger, stale_after_s=STALE, grace_s=GRACE, **kwargs)


@pytest.fixture
def reaper_running(engine, clean_ledger):
    """A reaper that ran a moment ago and is not armed (it spent its grace on the current
    silence a moment ago): it reaps this round."""
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO maintenance_state (name, last_run_at, last_armed_at) VALUES ('reaper', now(), now())"))


def requeue_dead_run(engine, ledger, settings, job_id) -> None:
    """What happens to a run whose worker died: its heartbeat ages past the stale threshold, the
    reaper (``reaper_running``) puts the job back in the queue, and its retry is due now."""
    backdate(engine, job_id, heartbeat_at=settings.stale_after_s + 1)
    reaper.reap(ledger, stale_after_s=settings.stale_after_s, grace_s=settings.reaper_grace_s)
    backdate(engine, job_id, run_after=1)  # skip the retry backoff


def running_job(ledger, tenant, **overrides):
    job = new_job(ledger, tenant, **overrides)
    return ledger.claim(job["id"], "w-lost")


def test_stale_job_is_requeued_while_attempts_remain(engine, ledger, tenant, reaper_running):
    claim = running_job(ledger, tenant)
    backdate(engine, claim.job["id"], heartbeat_at=STALE + 1)
    report = reap(ledger)
    assert report.status == "reaped" and [d["id"] for d in report.decisions] == [claim.job["id"]]
    row = ledger.get(claim.job["id"])
    assert row["status"] == "queued" and row["heartbeat_at"] is None and row["dispatched_at"] is None
    backoff = (row["run_after"] - row["updated_at"]).total_seconds()
    assert 2.5 <= backoff <= 5.0  # 5 s after a first attempt, with jitter
    (event,) = [e for e in ledger.events(claim.job["id"]) if e["from_status"] == "running"]
    assert (event["to_status"], event["attempt"], event["worker"]) == ("queued", 1, "w-lost")
    assert event["reason"].startswith("stale: no heartbeat for 61")


def test_stale_job_without_attempts_left_fails_as_stale(engine, ledger, tenant, reaper_running):
    claim = running_job(ledger, tenant, max_attempts=1)
    backdate(engine, claim.job["id"], heartbeat_at=STALE + 1)
    reap(ledger)
    row = ledger.get(claim.job["id"])
    assert (row["status"], row["error_code"]) == ("failed", "stale")
    assert row["finished_at"] is not None


def test_stale_job_with_a_cancel_request_is_cancelled(engine, ledger, tenant, reaper_running):
    claim = running_job(ledger, tenant)
    ledger.request_cancel(claim.job["id"], tenant.id)
    backdate(engine, claim.job["id"], heartbeat_at=STALE + 1)
    reap(ledger)
    assert ledger.get(claim.job["id"])["status"] == "cancelled"


def test_fresh_heartbeats_are_left_alone(engine, ledger, tenant, reaper_running):
    claim = running_job(ledger, tenant)
    backdate(engine, claim.job["id"], heartbeat_at=STALE - 5)
    assert reap(ledger).decisions == []
    assert ledger.get(claim.job["id"])["status"] == "running"


def test_dry_run_reports_and_changes_nothing(engine, ledger, tenant, reaper_running):
    claim = running_job(ledger, tenant)
    backdate(engine, claim.job["id"], heartbeat_at=STALE + 30)
    before = ledger.get(claim.job["id"])
    report = reap(ledger, dry_run=True)
    assert [(d["id"], d["to_status"]) for d in report.decisions] == [(claim.job["id"], "queued")]
    assert ledger.get(claim.job["id"]) == before
    assert reap(ledger).decisions  # and the real round still finds it


# -- the grace period ---------------------------------------------------------------


def test_first_run_after_an_outage_arms_and_reaps_nothing_until_armed_at(engine, ledger, tenant, reaper_running):
    claim = running_job(ledger, tenant)
    backdate(engine, claim.job["id"], heartbeat_at=STALE * 10)
    with engine.begin() as conn:  # beat was down for longer than the grace period
        conn.execute(text("UPDATE maintenance_state SET last_run_at = now() - interval '1 hour'"))
    report = reap(ledger)
    assert report.status == "arming" and report.decisions == []
    assert reap(ledger).status == "armed"
    assert ledger.get(claim.job["id"])["status"] == "running"

    with engine.begin() as conn:  # the grace period has passed
        conn.execute(text("UPDATE maintenance_state SET armed_at = now() - interval '1 second'"))
    report = reap(ledger)
    assert report.status == "reaped" and len(report.decisions) == 1


def test_a_live_worker_heartbeating_during_the_grace_period_is_not_reaped(engine, ledger, tenant, reaper_running):
    claim = running_job(ledger, tenant)
    backdate(engine, claim.job["id"], heartbeat_at=STALE * 10)
    with engine.begin() as conn:
        conn.execute(text("UPDATE maintenance_state SET last_run_at = now() - interval '1 hour'"))
    assert reap(ledger).status == "arming"
    ledger.heartbeat(claim.job["id"], claim.token)  # the worker is alive after all
    with engine.begin() as conn:
        conn.execute(text("UPDATE maintenance_state SET armed_at = now() - interval '1 second'"))
    assert reap(ledger).decisions == []
    assert ledger.get(claim.job["id"])["status"] == "running"


def test_a_reaper_that_never_ran_arms_first(ledger, clean_ledger):
    assert reap(ledger).status == "arming"


def test_restarting_the_reaper_process_does_not_reset_the_grace_period(settings, engine, ledger, clean_ledger):
    assert reap(ledger).status == "arming"
    # A new process: a new engine, new pool, new Ledger — and the same armed state.
    fresh = Ledger(get_engine(settings.database_url + "?application_name=restarted"))
    report = reap(fresh)
    assert report.status == "armed"
    with engine.connect() as conn:
        armed_at = conn.execute(text("SELECT armed_at FROM maintenance_state WHERE name = 'reaper'")).scalar()
    assert report.armed_until == armed_at


def test_a_reaper_finding_the_lock_taken_skips(engine, ledger, tenant, reaper_running):
    claim = running_job(ledger, tenant)
    backdate(engine, claim.job["id"], heartbeat_at=STALE + 1)
    with engine.connect() as holder:
        holder.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": reaper.ADVISORY_LOCK_KEY})
        assert reap(ledger).status == "skipped"
        assert ledger.get(claim.job["id"])["status"] == "running"
        holder.rollback()
    assert reap(ledger).status == "reaped"


def test_concurrent_reapers_reap_each_job_once(engine, ledger, tenant, reaper_running):
    claims = [running_job(ledger, tenant) for _ in range(5)]
    for claim in claims:
        backdate(engine, claim.job["id"], heartbeat_at=STALE + 1)
    barrier = threading.Barrier(4)
    reports = []

    def contend():
        barrier.wait()
        reports.append(reap(ledger))

    threads = [threading.Thread(target=contend) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(len(r.decisions) for r in reports) == 5
    for claim in claims:
        reaped = [t for t in transitions(ledger, claim.job["id"]) if t[0] == "running"]
        assert reaped == [("running", "queued", 1)]


# -- re-dispatch ----------------------------------------------------------------------


def test_redispatch_picks_unpublished_and_long_silent_jobs_with_backoff(engine, ledger, tenant, clean_ledger):
    never_published = new_job(ledger, tenant)
    just_created = new_job(ledger, tenant)
    lost_once = new_job(ledger, tenant)
    published_often = new_job(ledger, tenant)
    not_due = new_job(ledger, tenant)
    ledger.unpublished([never_published["id"]])  # its submission's publish failed
    backdate(engine, never_published["id"], updated_at=10, run_after=10)
    with engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET dispatch_count = 1, dispatched_at = now() - interval '70 s', "
                          "run_after = now() - interval '70 s' WHERE id = :id"), {"id": lost_once["id"]})
        conn.execute(text("UPDATE jobs SET dispatch_count = 3, dispatched_at = now() - interval '70 s', "
                          "run_after = now() - interval '70 s' WHERE id = :id"), {"id": published_often["id"]})
        conn.execute(text("UPDATE jobs SET dispatched_at = now() - interval '1 hour', "
                          "run_after = now() + interval '1 minute' WHERE id = :id"), {"id": not_due["id"]})
    due = set(redispatch.due(ledger, redispatch_after_s=60))
    assert due == {never_published["id"], lost_once["id"]}
    assert just_created["id"] not in due


def test_redispatch_skips_running_and_cancelled_jobs(engine, ledger, tenant, clean_ledger):
    running = new_job(ledger, tenant)
    ledger.claim(running["id"], "w")
    cancelled = new_job(ledger, tenant)
    ledger.request_cancel(cancelled["id"], tenant.id)
    backdate(engine, running["id"], updated_at=3600, run_after=3600)
    backdate(engine, cancelled["id"], updated_at=3600, run_after=3600)
    assert redispatch.due(ledger, redispatch_after_s=60) == []


# -- retention and orphans ---------------------------------------------------------------


def test_prune_removes_old_terminal_jobs_with_their_events(engine, ledger, tenant, clean_ledger):
    old = running_job(ledger, tenant)
    ledger.complete(old.job["id"], old.token, {})
    recent = running_job(ledger, tenant)
    ledger.complete(recent.job["id"], recent.token, {})
    old_but_running = running_job(ledger, tenant)
    backdate(engine, old.job["id"], finished_at=31 * 86400)
    backdate(engine, old_but_running.job["id"], created_at=40 * 86400)
    assert ledger.prune(retention_days=30, batch=prune.BATCH) == 1
    assert ledger.get(old.job["id"]) is None and ledger.events(old.job["id"]) == []
    assert ledger.get(recent.job["id"]) and ledger.get(old_but_running.job["id"])


def test_prune_forgets_probe_cache_entries_stored_before_the_retention(engine, ledger, tenant, clean_ledger):
    def key(path):
        return ProbeKey(path, 100, 1, 1, 1, "-v error")

    ledger.store_probes(tenant.id, [(key("old.mp4"), {"format": {}}), (key("recent.mp4"), {"format": {}})])
    with engine.begin() as conn:
        conn.execute(text("UPDATE probe_cache SET probed_at = now() - interval '31 days' WHERE path = 'old.mp4'"))

    assert prune.prune_jobs(ledger, retention_days=30) == 1

    assert ledger.cached_probes(tenant.id, [key("old.mp4"), key("recent.mp4")]) == [None, {"format": {}}]


def test_orphaned_temp_files_are_removed_unless_a_running_attempt_owns_them(ledger, tenant, settings):
    live = running_job(ledger, tenant)
    dead = running_job(ledger, tenant)
    ledger.fail(dead.job["id"], dead.token, code="x", message="x")
    tenant.media.mkdir(parents=True, exist_ok=True)
    owned = paths.temp_path_for(tenant.media / "a.mp4", str(live.job["id"]), live.token)
    stale_attempt = paths.temp_path_for(tenant.media / "b.mp4", str(live.job["id"]), live.token - 1 + 5)
    orphan = paths.temp_path_for(tenant.media / "c.mp4", str(dead.job["id"]), dead.token)
    young = paths.temp_path_for(tenant.media / "d.mp4", str(dead.job["id"]), dead.token)
    orphan_dir = paths.temp_path_for(tenant.media / "hls", str(dead.job["id"]), dead.token)
    for path in (owned, stale_attempt, orphan, young):
        path.write_bytes(b"partial")
    orphan_dir.mkdir()
    (orphan_dir / "seg0.ts").write_bytes(b"x")
    old = time.time() - 3600
    for path in (owned, stale_attempt, orphan, orphan_dir):
        os.utime(path, (old, old))
    removed = remove_orphaned_temp_files(ledger, settings.media_root, min_age_s=600)
    assert set(removed) == {stale_attempt, orphan, orphan_dir}
    assert owned.exists() and young.exists()
    assert not orphan.exists() and not orphan_dir.exists()


def test_idle_multipart_uploads_under_the_prefix_are_aborted_by_the_prune_duty(app, s3_settings, monkeypatch):
    """Idle means no part for the threshold (by the bucket's clock): the threshold spares an
    upload that just sent one, 0 takes it. Uploads outside the bucket's prefix are not ffworker's."""
    bucket = s3.bucket(s3_settings)
    client = s3.client()
    key = bucket.key("acme", "slow.bin")
    upload_id = client.create_multipart_upload(Bucket=bucket.name, Key=key)["UploadId"]
    client.upload_part(Bucket=bucket.name, Key=key, UploadId=upload_id, PartNumber=1, Body=b"x" * 1000)
    outside = client.create_multipart_upload(Bucket=bucket.name, Key="elsewhere/x.bin")["UploadId"]
    try:
        assert abort_orphaned_uploads(bucket, min_age_s=prune.ORPHAN_MIN_AGE_S) == []
        # The duty itself, in object-storage mode, with a threshold of 0.
        monkeypatch.setattr(prune, "ORPHAN_MIN_AGE_S", 0.0)
        monkeypatch.setattr(app.extensions["ffworker"], "settings", s3_settings)
        with app.app_context():
            assert prune.task()["uploads"] == 1
        remaining = client.list_multipart_uploads(Bucket=bucket.name)["Uploads"]
        assert [u["Key"] for u in remaining] == ["elsewhere/x.bin"]
    finally:
        client.abort_multipart_upload(Bucket=bucket.name, Key="elsewhere/x.bin", UploadId=outside)

