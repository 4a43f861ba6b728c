"""Beat's maintenance, one module per duty.

Each duty module owns its Celery task (named ``ffworker.maintenance.<duty>``), its
thresholds, and its beat entry: ``TASK``, ``SCHEDULE_ENTRY`` and
``interval_s(settings)``. ``ffworker.celery_wiring`` assembles Celery's ``include``,
the task routes and the beat schedule from ``DUTIES``, so adding a duty means writing
its module and listing it here.

Maintenance tasks run on their own queue (``<task_queue>.maintenance``), consumed by a
process of their own (the Procfile's ``maintenance``), so they never wait behind the job
queue's backlog nor for busy job processes.
"""
from __future__ import annotations

from ffworker.maintenance import prune, reaper, redispatch, webhook_relay

DUTIES = (reaper, redispatch, prune, webhook_relay)


def modules() -> list[str]:
    """The duty modules, for Celery's ``include`` (a worker imports them to know the tasks)."""
    return [duty.__name__ for duty in DUTIES]
