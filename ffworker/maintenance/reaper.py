"""The stale-job reaper, with a grace period kept in the database.

Thresholds: a running job whose heartbeat is older than
``FFWORKER_STALE_AFTER_S`` is stale. If the reaper's own previous run is older
than ``FFWORKER_REAPER_GRACE_S`` — beat, or the whole system, was down — every
heartbeat may be old for reasons that are not the workers' fault, so the
reaper arms itself (``armed_at = now() + grace``) and reaps nothing until then,
giving live workers time to heartbeat. Its state is a row in
``maintenance_state``, so restarting beat or the web processes does not reset it.

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

from ffworker.dispatch import dispatch
from ffworker.extensions import services
from ffworker.ledger import Ledger, seconds
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

    @property
    def requeued(self) -> list[dict]:
        return [d for d in self.decisions if d.get("status", d.get("to_status")) == "queued"]


def interval_s(settings) -> float:
    return settings.maintenance_interval_s


@shared_task(name=TASK, ignore_result=True)
def task() -> dict:
    current = services()
    report = reap(current.ledger, stale_after_s=current.settings.stale_after_s,
                  grace_s=current.settings.reaper_grace_s)
    for decision in report.requeued:
        dispatch(decision["id"], countdown=(decision["run_after"] - decision["updated_at"]).total_seconds())
    return {"status": report.status, "reaped": len(report.decisions)}


def reap(ledger: Ledger, *, stale_after_s: float, grace_s: float, dry_run: bool = False) -> ReapReport:
    with ledger.engine.begin() as conn:
        if not conn.execute(select(func.pg_try_advisory_xact_lock(ADVISORY_LOCK_KEY))).scalar():
            return ReapReport("skipped")
        conn.execute(insert(state).values(name=STATE_NAME).on_conflict_do_nothing())
        row = conn.execute(
            select(
                state.c.last_run_at, state.c.armed_at,
                (state.c.last_run_at.is_(None)
                 | (state.c.last_run_at < func.now() - seconds(grace_s))).label("outage"),
                (state.c.armed_at > func.now()).label("still_armed"),
            ).where(state.c.name == STATE_NAME).with_for_update()
        ).one()
        if dry_run:
            report_status = "arming" if row.outage else ("armed" if row.still_armed else "reaped")
            decisions = ledger.reap_stale(conn, stale_after_s, dry_run=True) if report_status == "reaped" else []
            conn.rollback()
            return ReapReport(report_status, decisions, row.armed_at)
        if row.outage:
            armed_at = conn.execute(
                state.update().where(state.c.name == STATE_NAME)
                .values(last_run_at=func.now(), armed_at=func.now() + seconds(grace_s))
                .returning(state.c.armed_at)
            ).scalar_one()
            log.warning("event=reaper_armed reason=%r armed_until=%s", f"previous run older than {grace_s:g} s",
                        armed_at.isoformat())
            return ReapReport("arming", armed_until=armed_at)
        conn.execute(state.update().where(state.c.name == STATE_NAME).values(last_run_at=func.now()))
        if row.still_armed:
            return ReapReport("armed", armed_until=row.armed_at)
        decisions = ledger.reap_stale(conn, stale_after_s)
    for decision in decisions:
        log.warning("job=%s attempt=%s event=reaped to=%s reason=%r", decision["id"], decision["attempts"],
                    decision["status"], decision["error_message"])
    return ReapReport("reaped", decisions)
