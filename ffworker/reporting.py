"""The reporting views (migrations 0002 and 0010, docs/ledger.md) as ``manage.py report`` prints them."""
from __future__ import annotations

import csv
import io
import json
import re
import uuid
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal

from sqlalchemy import Engine, text
from sqlalchemy.exc import ProgrammingError

VIEWS = ("daily", "usage", "wait", "stuck")

_QUERIES = {
    # The days (UTC) that overlap the window, newest first.
    "daily": """
        SELECT * FROM report_daily_jobs
         WHERE day >= ((now() - :since) AT TIME ZONE 'UTC')::date
           AND (CAST(:tenant AS text) IS NULL OR tenant = :tenant)
         ORDER BY day DESC, tenant, kind, status
    """,
    # The months (UTC) that overlap the window, newest first.
    "usage": """
        SELECT * FROM report_monthly_usage
         WHERE month >= date_trunc('month', (now() - :since) AT TIME ZONE 'UTC')::date
           AND (CAST(:tenant AS text) IS NULL OR tenant = :tenant)
         ORDER BY month DESC, tenant
    """,
    # Queue wait per tenant, the days (UTC) that overlap the window, newest first.
    "wait": """
        SELECT * FROM report_queue_wait
         WHERE day >= ((now() - :since) AT TIME ZONE 'UTC')::date
           AND (CAST(:tenant AS text) IS NULL OR tenant = :tenant)
         ORDER BY day DESC, tenant
    """,
    # Stuck now, whatever the window.
    "stuck": """
        SELECT * FROM report_stuck_jobs
         WHERE (CAST(:tenant AS text) IS NULL OR tenant = :tenant)
         ORDER BY silent_for_s DESC
    """,
}

TITLES = {
    "daily": "report_daily_jobs: jobs per day (UTC, by submission), tenant, kind and status",
    "usage": "report_monthly_usage: usage per tenant and month (UTC, by submission)",
    "wait": "report_queue_wait: queue wait per tenant and day (UTC, of the claim)",
    "stuck": "report_stuck_jobs: running jobs without a heartbeat for longer than the stale threshold",
}

# What the table format shows (CSV and JSON carry every column).
TABLE_COLUMNS = {
    "stuck": ("job_id", "tenant", "kind", "attempt", "worker", "last_heartbeat_at", "silent_for_s",
              "progress_percent", "reaper_outcome"),
}

_SINCE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([mhdw])\s*$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


class ReportError(Exception):
    pass


def parse_since(value: str) -> timedelta:
    """``30m``, ``12h``, ``7d``, ``2w``."""
    match = _SINCE.match(value or "")
    if not match:
        raise ReportError(f"--since {value!r}: give a number and a unit, like 30m, 12h, 7d or 2w")
    return timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})


@dataclass
class Table:
    view: str
    columns: list[str]
    rows: list[tuple]


def run(engine: Engine, *, since: timedelta, tenant: str | None = None, views=VIEWS,
        stale_after_s: float = 60.0) -> list[Table]:
    """The views' rows, in one read-only transaction."""
    try:
        return _run(engine, since=since, tenant=tenant, views=views, stale_after_s=stale_after_s)
    except ProgrammingError as exc:
        if "does not exist" in str(exc.orig):
            raise ReportError("the reporting views are missing: run `manage.py db upgrade`") from None
        raise


def _run(engine: Engine, *, since: timedelta, tenant: str | None, views, stale_after_s: float) -> list[Table]:
    tables = []
    with engine.connect() as conn:
        with conn.begin():
            conn.execute(text("SET TRANSACTION READ ONLY"))
            conn.execute(text("SELECT set_config('ffworker.stale_after_s', :value, true)"),
                         {"value": str(float(stale_after_s))})
            if tenant is not None and conn.execute(
                    text("SELECT 1 FROM tenants WHERE name = :name"), {"name": tenant}).first() is None:
                raise ReportError(f"no tenant named {tenant!r}")
            for view in views:
                result = conn.execute(text(_QUERIES[view]), {"since": since, "tenant": tenant})
                tables.append(Table(view, list(result.keys()), [tuple(row) for row in result]))
    return tables


# -- output -------------------------------------------------------------------------


def plain(value):
    """JSON/CSV-friendly value: dates ISO 8601, numbers as numbers, ids as strings."""
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def to_json(tables: list[Table]) -> str:
    return json.dumps(
        {t.view: [{c: plain(v) for c, v in zip(t.columns, row)} for row in t.rows] for t in tables},
        indent=2,
    )


def to_csv(tables: list[Table]) -> str:
    """One CSV document per view; several are separated by a blank line and a ``# view`` line."""
    out = io.StringIO()
    for index, table in enumerate(tables):
        if len(tables) > 1:
            out.write(("\n" if index else "") + f"# {table.view}\n")
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(table.columns)
        for row in table.rows:
            writer.writerow(["" if v is None else plain(v) for v in row])
    return out.getvalue()


def for_table(table: Table) -> Table:
    """The table narrowed to TABLE_COLUMNS, if the view has a selection."""
    keep = TABLE_COLUMNS.get(table.view)
    if not keep:
        return table
    index = [table.columns.index(c) for c in keep]
    return Table(table.view, list(keep), [tuple(row[i] for i in index) for row in table.rows])


def cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.2f}"
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    return str(plain(value))
