"""Celery tasks: thin, each takes a job id; the ledger holds everything else."""
from __future__ import annotations

from celery import shared_task

from ffworker import worker
from ffworker.dispatch import RUN_JOB, dispatch
from ffworker.extensions import services


@shared_task(name=RUN_JOB, ignore_result=True)
def run_job(job_id: str) -> str:
    current = services()
    report = worker.run(job_id, current.ledger, current.settings)
    if report.outcome == "retry":
        dispatch(job_id, countdown=report.retry_in_s)
    return report.outcome
