"""Re-dispatch: publish again the queued, due jobs whose message was lost.

Rows are committed before their message is sent, so a publish that failed, or a
message the broker lost, delays a job but never loses it. Thresholds:
``FFWORKER_REDISPATCH_AFTER_S`` after the last publish, doubling with each publish
up to ``MAX_WAIT_S``; a job never published is due ``NEVER_PUBLISHED_AFTER_S``
after its last change. Runs every ``FFWORKER_MAINTENANCE_INTERVAL_S``.
"""
from __future__ import annotations

import logging

from celery import shared_task

from ffworker.dispatch import dispatch
from ffworker.extensions import services
from ffworker.ledger import Ledger

log = logging.getLogger("ffworker.maintenance")

TASK = "ffworker.maintenance.redispatch"
SCHEDULE_ENTRY = "redispatch-lost-messages"
NEVER_PUBLISHED_AFTER_S = 5.0
MAX_WAIT_S = 3600.0
BATCH = 500


def interval_s(settings) -> float:
    return settings.maintenance_interval_s


def due(ledger: Ledger, redispatch_after_s: float) -> list:
    """The jobs whose message counts as lost now, at most ``BATCH``, most urgent first."""
    return ledger.due_for_dispatch(redispatch_after_s, never_published_after_s=NEVER_PUBLISHED_AFTER_S,
                                   max_wait_s=MAX_WAIT_S, limit=BATCH)


@shared_task(name=TASK, ignore_result=True)
def task() -> int:
    current = services()
    job_ids = due(current.ledger, current.settings.redispatch_after_s)
    published = sum(dispatch(job_id) for job_id in job_ids)
    if job_ids:
        log.info("event=redispatched count=%d of=%d", published, len(job_ids))
    return published
