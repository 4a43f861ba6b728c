"""Publishing a job's Celery message, always after its row is committed.

A publish that fails is not an error for the caller: the job stays queued
with ``dispatched_at`` unset, and beat's re-dispatch publishes it later. Nor is
a failure to stamp ``dispatched_at`` after a publish that worked. A submission's
row counts its first publish already (no write after it unless the publish fails).
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


def dispatch(job_id, *, countdown: float | None = None, submitted: bool = False) -> bool:
    """Publish a message for ``job_id``; None: a "run next" message, sent when a slot frees.

    ``submitted``: the job was just created, and its row already counts this publish
    (ffworker.ledger, ``_PUBLISHED_AT_SUBMISSION``): nothing to stamp unless it fails.

    A message never pins the job its worker runs: the worker claims the best eligible job
    (ffworker.ledger, ``claim_next``); the id only lets a message that came before its job
    was due be sent again for the rest of the delay.
    """
    celery = current_app.extensions["celery"]
    try:
        celery.send_task(
            RUN_JOB, args=[str(job_id) if job_id is not None else None],
            countdown=countdown + CLOCK_MARGIN_S if countdown else None,
        )
    except Exception as exc:  # kombu raises several families when the broker is away
        log.warning("job=%s event=publish_failed error=%s", job_id, type(exc).__name__)
        if submitted:
            _take_back([job_id])
        return False
    if job_id is not None and not submitted:
        try:
            services().ledger.mark_dispatched(job_id)
        except Exception as exc:
            # The row is committed and its message sent: the job will run. Missing bookkeeping
            # only makes the re-dispatcher publish it once more (a duplicate the claim ignores);
            # an error answer here would make a client submit the job a second time.
            log.warning("job=%s event=mark_dispatched_failed error=%s", job_id, type(exc).__name__)
    return True


def dispatch_many(job_ids, *, messages: int) -> None:
    """After a batch of one tenant's jobs committed: ``messages`` messages, not one per job.

    A message claims the best eligible job, and a tenant runs at most its slots' worth of
    jobs at once: more messages than its slots would only find the tenant at its limit
    (its next jobs start from the "run next" message each run end sends). Every job counts
    as published from its submission, so the re-dispatcher waits as long as for any
    published job, unless no message at all got through.
    """
    celery = current_app.extensions["celery"]
    job_ids = list(job_ids)
    sent = 0
    try:
        with celery.producer_or_acquire() as producer:
            for job_id in job_ids[:max(1, messages)]:
                celery.send_task(RUN_JOB, args=[str(job_id)], producer=producer)
                sent += 1
    except Exception as exc:  # the rest is left to the re-dispatcher, as for one job
        log.warning("event=publish_failed jobs=%d error=%s", len(job_ids), type(exc).__name__)
    if not sent:
        _take_back(job_ids)


def _take_back(job_ids) -> None:
    """A submission's publish failed: un-count it, so that the re-dispatcher sends the jobs
    soon. Should that write fail too, they are sent after FFWORKER_REDISPATCH_AFTER_S instead."""
    try:
        services().ledger.unpublished(job_ids)
    except Exception as exc:
        log.warning("event=unpublished_failed jobs=%d error=%s", len(job_ids), type(exc).__name__)


def run_next(count: int = 1) -> None:
    """Slots just freed (a run ended, a stale run was reaped): ``count`` "run next"
    messages, so that waiting work starts now rather than at the next re-dispatch round.
    A lost one is covered by re-dispatch; a surplus one claims nothing."""
    for _ in range(max(1, count)):
        dispatch(None)
