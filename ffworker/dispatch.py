"""Publishing a job's Celery message, always after its row is committed.

A publish that fails is not an error for the caller: the job stays queued
with ``dispatched_at`` unset, and beat's re-dispatch publishes it later. Nor is
a failure to stamp ``dispatched_at`` after a publish that worked.
"""
from __future__ import annotations

import logging

from flask import current_app

from ffworker.extensions import services

log = logging.getLogger("ffworker.dispatch")

RUN_JOB = "ffworker.run_job"
# Celery's countdown runs on the worker's clock, the claim on the database's:
# arrive a little late rather than early.
CLOCK_MARGIN_S = 1.0


def dispatch(job_id, *, countdown: float | None = None) -> bool:
    celery = current_app.extensions["celery"]
    try:
        celery.send_task(
            RUN_JOB, args=[str(job_id)],
            countdown=countdown + CLOCK_MARGIN_S if countdown else None,
        )
    except Exception as exc:  # kombu raises several families when the broker is away
        log.warning("job=%s event=publish_failed error=%s", job_id, type(exc).__name__)
        return False
    try:
        services().ledger.mark_dispatched(job_id)
    except Exception as exc:
        # The row is committed and its message sent: the job will run. Missing bookkeeping
        # only makes the re-dispatcher publish it once more (a duplicate the claim ignores);
        # an error answer here would make a client submit the job a second time.
        log.warning("job=%s event=mark_dispatched_failed error=%s", job_id, type(exc).__name__)
    return True
