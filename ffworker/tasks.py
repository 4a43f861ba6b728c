"""Celery tasks: thin, each takes a job id; the ledger holds everything else."""
from __future__ import annotations

from celery import shared_task

from ffworker import worker
from ffworker.dispatch import RUN_JOB, dispatch, run_next
from ffworker.extensions import services

# Outcomes that freed the run's slots.
_ENDED = ("completed", "failed", "cancelled", "retry")


@shared_task(name=RUN_JOB, ignore_result=True)
def run_job(job_id: str | None = None) -> str:
    current = services()
    report = worker.run(job_id, current.ledger, current.settings)
    if report.outcome == "retry":
        dispatch(report.row["id"], countdown=report.retry_in_s)
    if report.due_in_s is not None:
        # The message came before its job was due (a countdown fires on this host's
        # clock, the claim goes by the database's): send it again for the remaining
        # delay the database computed, rather than leave the job to the re-dispatcher.
        dispatch(job_id, countdown=report.due_in_s)
    if report.outcome in _ENDED:
        run_next((report.row or {}).get("slots") or 1)
    return report.outcome
