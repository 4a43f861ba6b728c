"""A message that arrives before its job is due (a retry's countdown fired by a worker
whose clock runs ahead of the database's) is sent again for the remaining delay the
database computed: the job runs when due, not when the re-dispatcher next looks."""
from __future__ import annotations

import time

import pytest
from sqlalchemy import text

from ffworker.dispatch import dispatch
from tests.e2e.test_worker import events, finished

pytestmark = pytest.mark.e2e


def test_an_early_message_still_gets_its_job_run_when_due(worker, app, client, ledger, engine, tenant, make_clip):
    make_clip(tenant.media / "in.mp4", seconds=1)
    job, _ = ledger.create(tenant_id=tenant.id, kind="probe", spec={"input": "in.mp4"}, workspace="default",
                           priority=0, metadata={}, max_attempts=3, timeout_s=60)
    with engine.begin() as conn:  # due in 2 s by the database's clock
        conn.execute(text("UPDATE jobs SET run_after = now() + interval '2 seconds' WHERE id = :id"),
                     {"id": job["id"]})
    started = time.monotonic()
    with app.app_context():
        assert dispatch(job["id"], submitted=True)  # no countdown: it arrives about 2 s early
    # No beat runs here: without the re-publish the job would wait for ever.
    done = finished(client, tenant, job["id"], timeout_s=15)
    assert done["status"] == "completed"
    assert time.monotonic() - started < 10
    assert events(ledger, job["id"]) == [(None, "queued", 0), ("queued", "running", 1), ("running", "completed", 1)]
    assert ledger.get(job["id"])["dispatch_count"] == 2  # the first publish and the re-publish
    assert "is queued but not due for" in worker.log_path.read_text()
