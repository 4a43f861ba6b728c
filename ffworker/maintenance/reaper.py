"""The stale-job reaper, with a grace period kept in the database.

Thresholds: a running job whose heartbeat is older than
``FFWORKER_STALE_AFTER_S`` is stale. After an outage every heartbeat may be old
for reasons that are not the workers' fault, so the reaper arms itself
(``armed_at = now() + grace``) and reaps nothing until then, giving live
workers time to heartbeat. It arms when

* its own previous round is older than ``FFWORKER_STALE_AFTER_S`` plus one
  ``FFWORKER_MAINTENANCE_INTERVAL_S`` — rounds were missed: beat, or the ledger
  itself, was unreachable; or
* the newest heartbeat of all running jobs is older than the stale threshold
  — the whole fleet silent is an outage, not dead workers — and came after the
  reaper's last arming. One arming per silence: once its grace has passed, jobs
  still silent are reaped, so a single dead worker delays its job by one grace
  period, not forever.

Its state is a row in ``maintenance_state``, so restarting beat or the web
processes does not reset it.

Any number of reapers may run at once (several beat processes, ``manage.py
reap``): a transaction-scoped advisory lock lets one act per round; the others
skip. Beat runs it every ``FFWORKER_MAINTENANCE_INTERVAL_S``; the jobs it sends
back to the queue are published again at once, with their backoff as countdown.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from celery import shared_task
from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert

from ffworker.dispatch import dispatch, run_next
from ffworker.extensions import services
from ffworker.ledger import Ledger, is_stale, jobs, seconds
from ffworker.models import MaintenanceState

log = logging.getLogger("ffworker.reaper")

TASK = "ffworker.maintenance.reap"
SCHEDULE_ENTRY = "reap-stale-jobs"
STATE_NAME = "reaper"
ADVISORY_LOCK_KEY = 0x66667772  # "ffwr"
state = MaintenanceState.__table__


@dataclass
class ReapReport:
    status: str                      # skipped (another reaper holds the lock), arming, armed, reaped
    decisions: list[dict] = field(default_factory=list)
    armed_until: object = None
    reason: str | None = None        # why it armed, for "arming"

    @property
    def requeued(self) -> list[dict]:
        return [d for d in self.decisions if d.get("status", d.get("to_status")) == "queued"]


def interval_s(settings) -> float:
    return settings.maintenance_interval_s


@shared_task(name=TASK, ignore_result=True)
def task() -> dict:
    current = services()
    report = reap(current.ledger, stale_after_s=current.settings.stale_after_s,
                  grace_s=current.settings.reaper_grace_s, interval_s=current.settings.maintenance_interval_s)
    for decision in report.requeued:
        dispatch(decision["id"], countdown=(decision["run_after"] - decision["updated_at"]).total_seconds())
    if report.status == "reaped" and report.decisions:
        # The reaped runs' slots are free now: waiting work starts at once.
        run_next(sum(decision.get("slots") or 1 for decision in report.decisions))
    return {"status": report.status, "reaped": len(report.decisions)}


def reap(ledger: Ledger, *, stale_after_s: float, grace_s: float, interval_s: float = 0.0,
         dry_run: bool = False) -> ReapReport:
    """One round: arm (see the module's rule), wait out the grace, or reap.

    ``interval_s`` is the time between two rounds (``FFWORKER_MAINTENANCE_INTERVAL_S``):
    a previous round older than the stale threshold plus one interval means rounds were
    missed, so the ledger (or beat) was unreachable for longer than a heartbeat may be.
    """
    with ledger.engine.begin() as conn:
        if not conn.execute(select(func.pg_try_advisory_xact_lock(ADVISORY_LOCK_KEY))).scalar():
            return ReapReport("skipped")
        conn.execute(insert(state).values(name=STATE_NAME).on_conflict_do_nothing())
        newest_heartbeat = (
            select(func.max(jobs.c.heartbeat_at)).where(jobs.c.status == "running").scalar_subquery()
        )
        row = conn.execute(
            select(
                state.c.last_run_at, state.c.armed_at,
                (state.c.last_run_at.is_(None)
                 | (state.c.last_run_at < func.now() - seconds(stale_after_s + interval_s))).label("missed_rounds"),
                # Every running job silent, in a silence that began after the last arming
                # (its newest heartbeat is later): one the grace was not given to yet.
                (is_stale(newest_heartbeat, stale_after_s)
                 & (state.c.last_armed_at.is_(None) | (newest_heartbeat > state.c.last_armed_at))
                 ).label("fleet_silent"),
                (state.c.armed_at > func.now()).label("still_armed"),
            ).where(state.c.name == STATE_NAME).with_for_update()
        ).one()
        outage = _outage(row, stale_after_s, interval_s)
        if dry_run:
            report_status = "arming" if outage else ("armed" if row.still_armed else "reaped")
            decisions = ledger.reap_stale(conn, stale_after_s, dry_run=True) if report_status == "reaped" else []
            conn.rollback()
            return ReapReport(report_status, decisions, row.armed_at, outage)
        if outage:
            armed_at = conn.execute(
                state.update().where(state.c.name == STATE_NAME)
                .values(last_run_at=func.now(), armed_at=func.now() + seconds(grace_s), last_armed_at=func.now())
                .returning(state.c.armed_at)
            ).scalar_one()
            log.warning("event=reaper_armed reason=%r armed_until=%s", outage, armed_at.isoformat())
            return ReapReport("arming", armed_until=armed_at, reason=outage)
        conn.execute(state.update().where(state.c.name == STATE_NAME).values(last_run_at=func.now()))
        if row.still_armed:
            return ReapReport("armed", armed_until=row.armed_at)
        decisions = ledger.reap_stale(conn, stale_after_s)
    for decision in decisions:
        log.warning("job=%s attempt=%s event=reaped to=%s reason=%r", decision["id"], decision["attempts"],
                    decision["status"], decision["error_message"])
    return ReapReport("reaped", decisions)


def _outage(row, stale_after_s: float, interval_s: float) -> str | None:
    """Why this round must arm, or None. Missed rounds re-arm even while armed (the outage
    went on); a silent fleet arms only when not armed already."""
    if row.missed_rounds:
        return f"previous round older than {stale_after_s + interval_s:g} s" if row.last_run_at else "first round"
    if row.fleet_silent and not row.still_armed:
        return f"no running job heartbeated for {stale_after_s:g} s"
    return None
