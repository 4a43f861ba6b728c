"""Worker log lines carry the job they belong to.

ffworker's own worker lines are ``job=<id> attempt=<n> event=<what> key=value…``.
Celery's lines about the same task (``Task ffworker.run_job[<task id>]
succeeded in 2.1s: 'completed'``, a traceback's first line) name only Celery's
task id; while a ``run_job`` task runs, this filter appends ``job=<id>`` to
every line that lacks one, so ``grep job=<id>`` finds the whole story.
"""
from __future__ import annotations

import contextvars
import logging

from celery.signals import after_setup_logger, after_setup_task_logger, task_postrun, task_prerun

from ffworker.dispatch import RUN_JOB

_current_job: contextvars.ContextVar[str | None] = contextvars.ContextVar("ffworker_job", default=None)


class JobContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        job_id = _current_job.get()
        if job_id is not None:
            message = record.getMessage()
            if "job=" not in message:
                record.msg, record.args = f"{message} job={job_id}", ()
        return True


_FILTER = JobContextFilter()


@task_prerun.connect
def _enter_job(sender=None, args=None, **_) -> None:
    if getattr(sender, "name", None) == RUN_JOB and args:
        _current_job.set(str(args[0]))


@task_postrun.connect
def _leave_job(sender=None, **_) -> None:
    if getattr(sender, "name", None) == RUN_JOB:
        _current_job.set(None)


@after_setup_logger.connect
@after_setup_task_logger.connect
def _install(logger=None, **_) -> None:
    for handler in getattr(logger, "handlers", ()):
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)
