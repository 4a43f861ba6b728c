"""Lost messages, failed publishes and zombie workers, through a real worker process."""
from __future__ import annotations

import pytest
from sqlalchemy import text

from ffworker.maintenance import reaper, redispatch
from ffworker.app import create_app
from tests.e2e.test_worker import events, finished, leftovers, submit
from tests.helpers import ffmpeg_processes_touching, make_celery_current, wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture
def reaper_running(engine):
    with engine.begin() as conn:
        # Ran just now, not armed, and already gave the current silence its grace: it reaps.
        conn.execute(text("INSERT INTO maintenance_state (name, last_run_at, last_armed_at) VALUES ('reaper', now(), now()) "
                          "ON CONFLICT (name) DO UPDATE SET last_run_at = now(), armed_at = NULL, last_armed_at = now()"))


def test_a_lost_message_is_published_again_and_the_job_completes(worker, app, client, ledger, engine, tenant,
                                                                 make_clip):
    make_clip(tenant.media / "in.mp4", seconds=1)
    # The row is committed (counting its publish, as a submission does) but the web process died
    # before the message reached the broker: once the re-dispatch threshold has passed, beat sends it.
    job, _ = ledger.create(tenant_id=tenant.id, kind="probe", spec={"input": "in.mp4"}, workspace="default",
                           priority=0, metadata={}, max_attempts=3, timeout_s=60)
    with engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET updated_at = now() - interval '10 s', dispatched_at = now() - "
                          "make_interval(secs => :late), run_after = now() - make_interval(secs => :late) "
                          "WHERE id = :id"),
                     {"id": job["id"], "late": app.extensions["ffworker"].settings.redispatch_after_s + 5})
    with app.app_context():
        assert redispatch.task() == 1
    done = finished(client, tenant, job["id"])
    assert done["status"] == "completed"
    assert ledger.get(job["id"])["dispatch_count"] == 2


def test_a_publish_failing_right_after_commit_delays_the_job_but_never_loses_it(
        worker, app, settings, client, ledger, engine, tenant, make_clip):
    make_clip(tenant.media / "in.mp4", seconds=1)
    broker_down = create_app({"TESTING": True, "FFWORKER_SETTINGS": settings.with_overrides(
        broker_url="redis://127.0.0.1:9/0")})
    make_celery_current(app)  # shared tasks keep running on the working app
    response = broker_down.test_client().post("/v1/jobs", json={"kind": "probe", "input": "in.mp4"},
                                              headers=tenant.headers)
    assert response.status_code == 202
    job_id = response.json["id"]
    row = ledger.get(job_id)
    assert row["status"] == "queued" and row["dispatched_at"] is None
    with engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET updated_at = now() - interval '10 s' WHERE id = :id"), {"id": job_id})
    with app.app_context():
        assert redispatch.task() == 1
    assert finished(client, tenant, job_id)["status"] == "completed"


def test_a_reaped_worker_stops_its_ffmpeg_and_writes_nothing_more(
        worker, app, client, ledger, engine, tenant, make_clip, reaper_running):
    make_clip(tenant.media / "src.mp4", seconds=4, size="640x360")
    job = submit(client, tenant, kind="transcode", input="src.mp4", output="out.mp4",
                 video={"codec": "h264", "height": 720, "preset": "slow"})
    job_id = job["id"]
    wait_until(lambda: ledger.get(job_id)["status"] == "running" and ffmpeg_processes_touching(f"{job_id}.1."), 30)
    zombie_temp = wait_until(lambda: [p for p in tenant.media.iterdir() if f"{job_id}.1." in p.name], 10)

    # The worker looks dead to the reaper: its heartbeat is backdated past the threshold.
    def reaped():
        with engine.begin() as conn:
            conn.execute(text("UPDATE jobs SET heartbeat_at = now() - interval '10 minutes' "
                              "WHERE id = :id AND status = 'running'"), {"id": job_id})
        with app.app_context():
            return reaper.task()["reaped"]

    wait_until(reaped, 10)
    assert ledger.get(job_id)["status"] == "queued"

    # The zombie finds out at its next fenced write: ffmpeg killed, temp output gone.
    wait_until(lambda: not ffmpeg_processes_touching(f"{job_id}.1."), 5)
    wait_until(lambda: f"job={job_id} attempt=1 event=lost" in worker.log_path.read_text(), 5)
    assert not any(p.exists() for p in zombie_temp)

    done = finished(client, tenant, job_id, timeout_s=60)
    assert done["status"] == "completed" and done["attempts"] == 2
    assert [(f, t, a) for f, t, a in events(ledger, job_id)] == [
        (None, "queued", 0), ("queued", "running", 1), ("running", "queued", 1),
        ("queued", "running", 2), ("running", "completed", 2),
    ]
    assert leftovers(tenant.media) == []
