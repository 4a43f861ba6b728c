"""What the dashboard reads. Reads only: every write goes through ``ffworker.ledger``.

Each page is one connection and a few indexed statements, whatever the ledger's size:
the jobs list is a keyset page of an index (``ix_jobs_tenant_*`` for a tenant,
``ix_jobs_created``/``ix_jobs_status_created`` for an operator across tenants); the
overview reads the live jobs (queued, running: a small share of the ledger) and the jobs
that ended in the last 24 h (``ix_jobs_terminal_finished``).
"""
from __future__ import annotations

import base64
import json
import re
import uuid
from datetime import datetime
from typing import Any, Iterable, Mapping

from sqlalchemy import Engine, func, select, text, tuple_

from ffworker.ledger import job_filter
from ffworker.models import Job, Tenant

jobs = Job.__table__
tenants = Tenant.__table__

_TENANT_NAME = select(tenants.c.name).where(tenants.c.id == jobs.c.tenant_id).scalar_subquery().label("tenant_name")
LIST_COLUMNS = (
    jobs.c.id, jobs.c.tenant_id, jobs.c.kind, jobs.c.status, jobs.c.workspace, jobs.c.priority, jobs.c.attempts,
    jobs.c.max_attempts, jobs.c.created_at, jobs.c.updated_at, jobs.c.started_at, jobs.c.finished_at,
    jobs.c.run_after, jobs.c.cancel_requested_at, jobs.c.progress_at, jobs.c.progress_percent,
    jobs.c.progress_eta_s, jobs.c.progress_speed, jobs.c.error_code, jobs.c.error_message, _TENANT_NAME,
)
HEX = re.compile(r"^[0-9a-f]{1,32}$")


def _rows(result) -> list[dict]:
    return [dict(row) for row in result.mappings()]


# -- cursors and id search ---------------------------------------------------------


def encode_cursor(row: Mapping) -> str:
    raw = json.dumps([row["created_at"].isoformat(), str(row["id"])]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID] | None:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, job_id = json.loads(raw)
        return datetime.fromisoformat(created_at), uuid.UUID(job_id)
    except (ValueError, TypeError, AttributeError):
        return None


def id_range(prefix: str) -> tuple[uuid.UUID, uuid.UUID | None] | None:
    """The ids starting with ``prefix`` (hex, dashes ignored) as a range of the primary key."""
    digits = prefix.strip().lower().replace("-", "")
    if not HEX.match(digits):
        return None
    low = uuid.UUID(digits.ljust(32, "0"))
    value = int(digits, 16) + 1
    if value >= 16 ** len(digits):
        return low, None
    return low, uuid.UUID(format(value, "x").rjust(len(digits), "0").ljust(32, "0"))


# -- the jobs list -------------------------------------------------------------------


def list_jobs(engine: Engine, filters: Mapping[str, Any], *, limit: int, before=None,
              id_prefix: tuple | None = None) -> tuple[list[dict], datetime]:
    """A page of jobs matching ``filters`` (``job_filter``'s names), newest first, and the
    database's clock when it was read."""
    query = select(*LIST_COLUMNS).where(*job_filter(**filters))
    if before is not None:
        query = query.where(tuple_(jobs.c.created_at, jobs.c.id) < tuple_(*before))
    if id_prefix is not None:
        low, high = id_prefix
        query = query.where(jobs.c.id >= low)
        if high is not None:
            query = query.where(jobs.c.id < high)
    query = query.order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit)
    with engine.connect() as conn:
        now = conn.execute(select(func.now())).scalar_one()
        rows = _rows(conn.execute(query))
    return rows, now


def count_jobs(engine: Engine, filters: Mapping[str, Any], statuses: Iterable[str], *,
               not_cancel_requested_running: bool = False) -> int:
    query = select(func.count()).select_from(jobs).where(*job_filter(**filters), jobs.c.status.in_(tuple(statuses)))
    if not_cancel_requested_running:
        query = query.where((jobs.c.status != "running") | jobs.c.cancel_requested_at.is_(None))
    with engine.connect() as conn:
        return conn.execute(query).scalar_one()


def watched(engine: Engine, ids: list, tenant_id, newer: tuple[Mapping, datetime] | None,
            known: set, limit: int = 50) -> tuple[list[dict], list[dict]]:
    """The live stream's tick: the watched jobs as they are now (primary-key lookups), and
    ``newer`` = (filters, since): jobs of that filter created since ``since`` that are not
    ``known`` yet (a page of the listing's own index)."""
    with engine.connect() as conn:
        current: list[dict] = []
        if ids:
            query = select(*LIST_COLUMNS).where(jobs.c.id.in_(ids))
            if tenant_id is not None:
                query = query.where(jobs.c.tenant_id == tenant_id)
            current = _rows(conn.execute(query))
        fresh: list[dict] = []
        if newer is not None:
            filters, since = newer
            query = (select(*LIST_COLUMNS).where(*job_filter(**filters), jobs.c.created_at > since)
                     .order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit))
            fresh = [row for row in _rows(conn.execute(query)) if str(row["id"]) not in known]
    return current, fresh


def job(engine: Engine, job_id, tenant_id) -> tuple[dict | None, list[dict]]:
    """The whole job row (with its tenant's name) and its audit trail, from one snapshot."""
    query = select(*jobs.c, _TENANT_NAME).where(jobs.c.id == job_id)
    if tenant_id is not None:
        query = query.where(jobs.c.tenant_id == tenant_id)
    with engine.connect() as conn:
        conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            row = conn.execute(query).mappings().first()
            if row is None:
                return None, []
            trail = _rows(conn.execute(text(
                "SELECT id, at, from_status, to_status, attempt, actor, worker, reason FROM job_events "
                "WHERE job_id = :id ORDER BY id"), {"id": job_id}))
    return dict(row), trail


def db_now(engine: Engine) -> datetime:
    with engine.connect() as conn:
        return conn.execute(select(func.now())).scalar_one()


def tenant_names(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(select(tenants.c.name).order_by(tenants.c.name)).scalars())


def tenant_id(engine: Engine, name: str):
    with engine.connect() as conn:
        return conn.execute(select(tenants.c.id).where(tenants.c.name == name)).scalar()


# -- the overview -------------------------------------------------------------------------

_PER_KIND = """
WITH live AS (
    SELECT tenant_id, kind, status FROM jobs
     WHERE status IN ('queued', 'running') AND (CAST(:tenant_id AS uuid) IS NULL OR tenant_id = :tenant_id)
), ended AS (
    -- Jobs that ended in the last 24 h. Run time as report_daily_jobs measures it: the final
    -- run, from its claim to the terminal transition (jobs cancelled before they ran have none).
    SELECT tenant_id, kind, status,
           CASE WHEN started_at IS NOT NULL THEN extract(epoch FROM finished_at - started_at)::float8 END AS run_s
      FROM jobs
     WHERE status IN ('completed', 'failed', 'cancelled') AND finished_at >= now() - interval '24 hours'
       AND (CAST(:tenant_id AS uuid) IS NULL OR tenant_id = :tenant_id)
), counted AS (
    SELECT tenant_id, kind,
           count(*) FILTER (WHERE status = 'queued') AS queued,
           count(*) FILTER (WHERE status = 'running') AS running,
           0 AS completed_24h, 0 AS failed_24h, 0 AS cancelled_24h, NULL::float8 AS run_s
      FROM live GROUP BY tenant_id, kind
    UNION ALL
    SELECT tenant_id, kind, 0, 0,
           (status = 'completed')::int, (status = 'failed')::int, (status = 'cancelled')::int, run_s
      FROM ended
)
SELECT t.name AS tenant, c.kind,
       sum(c.queued)::bigint AS queued, sum(c.running)::bigint AS running,
       sum(c.completed_24h)::bigint AS completed_24h, sum(c.failed_24h)::bigint AS failed_24h,
       sum(c.cancelled_24h)::bigint AS cancelled_24h,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY c.run_s) AS run_p50_s,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY c.run_s) AS run_p95_s,
       GROUPING(t.name, c.kind) = 3 AS is_total
  FROM counted c JOIN tenants t ON t.id = c.tenant_id
 GROUP BY GROUPING SETS ((t.name, c.kind), ())
 ORDER BY is_total, t.name, c.kind
"""

_OLDEST_DUE = """
SELECT j.id, t.name AS tenant, j.kind, j.run_after, extract(epoch FROM now() - j.run_after)::float8 AS waiting_s
  FROM jobs j JOIN tenants t ON t.id = j.tenant_id
 WHERE j.status = 'queued' AND j.run_after <= now()
   AND (CAST(:tenant_id AS uuid) IS NULL OR j.tenant_id = :tenant_id)
 ORDER BY j.run_after
 LIMIT 1
"""

_STUCK = """
SELECT job_id, tenant, kind, attempt, max_attempts, worker, silent_for_s, progress_percent, reaper_outcome
  FROM report_stuck_jobs
 WHERE (CAST(:tenant AS text) IS NULL OR tenant = :tenant)
 ORDER BY silent_for_s DESC
 LIMIT 50
"""


def overview(engine: Engine, *, tenant_id, tenant_name: str | None, stale_after_s: float) -> dict:
    """Queued/running now and what ended in the last 24 h per tenant and kind (with the 24 h
    throughput and run-time percentiles), the oldest due job and the stuck jobs, from one
    read-only snapshot."""
    params = {"tenant_id": tenant_id, "tenant": tenant_name}
    with engine.connect() as conn:
        conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            conn.execute(text("SET TRANSACTION READ ONLY"))
            conn.execute(text("SELECT set_config('ffworker.stale_after_s', :value, true)"),
                         {"value": str(float(stale_after_s))})
            rows = _rows(conn.execute(text(_PER_KIND), params))
            oldest = conn.execute(text(_OLDEST_DUE), params).mappings().first()
            stuck = _rows(conn.execute(text(_STUCK), params))
            now = conn.execute(select(func.now())).scalar_one()
    totals = next((row for row in rows if row["is_total"]), None)
    return {
        "rows": [row for row in rows if not row["is_total"]],
        "totals": totals,
        "oldest_due": dict(oldest) if oldest else None,
        "stuck": stuck,
        "now": now,
    }
