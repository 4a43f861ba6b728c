"""The job ledger: the only code that writes job state.

Every state change is one guarded ``UPDATE … WHERE status … RETURNING`` that
writes, in the same statement, the ``job_events`` row recording it (with its
``actor``) and the NOTIFY that wakes the job's watchers. A run's
later writes are fenced by its attempt number (the token the claim returned):
a write that matches no row raises a typed error from ``ffworker.errors`` and
the caller decides what to do; nothing here ever silently succeeds.

All timestamps are the database's ``now()``: no process's clock decides
anything.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Mapping

from sqlalchemy import (
    Boolean, ColumnElement, Connection, Double, Engine, and_, bindparam, case, delete, func, insert, literal,
    literal_column, null, select, text,
    tuple_, update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert

from sqlalchemy.exc import OperationalError

from ffworker.errors import AlreadyTerminal, FencedOut, JobBusy, JobNotFound, NotClaimable, NotRetryable
from ffworker.models import NOTIFY_CHANNEL as CHANNEL, TERMINAL_STATUSES, Job, JobEvent, ProbeCache, Tenant

jobs = Job.__table__
events = JobEvent.__table__
tenants = Tenant.__table__
probe_cache = ProbeCache.__table__

Row = Mapping[str, Any]

PROGRESS_COLUMNS = {
    "percent": "progress_percent",
    "frame": "progress_frame",
    "fps": "progress_fps",
    "speed": "progress_speed",
    "out_time_s": "progress_out_time_s",
    "eta_s": "progress_eta_s",
}

_TENANT_NAME = (
    select(tenants.c.name).where(tenants.c.id == jobs.c.tenant_id).scalar_subquery().label("tenant_name")
)
_RETURNING = (*jobs.c, _TENANT_NAME)


def seconds(amount) -> ColumnElement:
    """An interval of ``amount`` seconds; ``amount`` is a number or a SQL expression."""
    return func.make_interval(0, 0, 0, 0, 0, 0, amount)


def days(amount) -> ColumnElement:
    """An interval of ``amount`` days (calendar days, as the retention counts them)."""
    return func.make_interval(0, 0, 0, amount)


def is_stale(heartbeat_at, stale_after_s) -> ColumnElement:
    """Whether a run's last heartbeat is older than ``stale_after_s``.

    The SQL function of migration 0006 is the one definition: the reaper, the metrics and
    ``report_stuck_jobs`` all call it, so they can never disagree on which job is stale.
    """
    return func.ffworker_is_stale(heartbeat_at, stale_after_s, type_=Boolean)


# Retry backoff, computed by the database from the attempt that just ended (a worker's
# transient failure or a stale run alike): 5 s, 10 s, 20 s … at most 300 s, each times a
# random 0.5–1 so that a batch failing together does not come back together.
BACKOFF_BASE_S = 5.0
BACKOFF_CAP_S = 300.0
_RETRY_DELAY = seconds(
    func.least(BACKOFF_CAP_S, BACKOFF_BASE_S * func.power(2, jobs.c.attempts - 1)) * (0.5 + func.random() / 2)
)

# What the reaper does with a stale running job.
_REAP_OUTCOME = case(
    (jobs.c.cancel_requested_at.is_not(None), "cancelled"),
    (jobs.c.attempts < jobs.c.max_attempts, "queued"),
    else_="failed",
)


_SUBMITTED_COLUMNS = ("id", "tenant_id", "kind", "spec", "workspace", "priority", "metadata", "max_attempts",
                      "timeout_s", "idempotency_key", "request_sha256", "webhook_url", "slots")


# A submission counts as its message's first publish: the API publishes right after the commit,
# and stamping the row then would be one more write per job. A publish that fails takes the
# stamp back (``unpublished``), and the re-dispatcher treats the job as never published.
_PUBLISHED_AT_SUBMISSION = {"dispatched_at": func.now(), "dispatch_count": 1}


def _submit_statement():
    """Insert a queued job and its ``submitted`` event, in one statement. No NOTIFY: nobody
    can follow a job before its id is returned, and PostgreSQL makes the commits of
    notifying transactions wait for each other (one lock, held until each commit ends)."""
    job = (
        pg_insert(jobs)
        .values({**{column: bindparam(column) for column in _SUBMITTED_COLUMNS}, **_PUBLISHED_AT_SUBMISSION})
        .on_conflict_do_nothing(
            index_elements=["tenant_id", "idempotency_key"], index_where=text("idempotency_key IS NOT NULL"),
        )
        .returning(*jobs.c)
        .cte("job")
    )
    event = insert(events).from_select(
        ["job_id", "from_status", "to_status", "attempt", "reason", "actor"],
        select(job.c.id, null(), literal("queued"), literal(0), literal("submitted"), literal("api")),
    ).cte("submitted")
    return select(job).add_cte(event)


# Built once: every submission runs them, and building a statement per call nearly doubled its
# Python cost.
_SUBMIT = _submit_statement()
_MARK_DISPATCHED = (
    update(jobs)
    .where(jobs.c.id == bindparam("job_id"), jobs.c.status == "queued")
    .values(dispatched_at=func.now(), dispatch_count=jobs.c.dispatch_count + 1)
)


# A batch in one statement, built once: one array per column, unnested into rows (a
# statement with one VALUES row per job would be compiled again for every batch size).
_SUBMIT_MANY = text("""
WITH job AS (
    INSERT INTO jobs (id, tenant_id, kind, spec, workspace, priority, metadata, max_attempts, timeout_s,
                      idempotency_key, request_sha256, webhook_url, slots, dispatched_at, dispatch_count)
    SELECT v.id, :tenant_id, v.kind, v.spec::jsonb, v.workspace, v.priority, v.metadata::jsonb, v.max_attempts,
           v.timeout_s, v.idempotency_key, :request_sha256, v.webhook_url, v.slots, now(), 1
      FROM unnest(CAST(:ids AS uuid[]), CAST(:kind AS text[]), CAST(:spec AS text[]), CAST(:workspace AS text[]),
                  CAST(:priority AS integer[]), CAST(:metadata AS text[]), CAST(:max_attempts AS integer[]),
                  CAST(:timeout_s AS integer[]), CAST(:keys AS text[]), CAST(:webhook_url AS text[]),
                  CAST(:slots AS integer[]))
           WITH ORDINALITY AS v(id, kind, spec, workspace, priority, metadata, max_attempts, timeout_s,
                                idempotency_key, webhook_url, slots, n)
     ORDER BY v.n
    ON CONFLICT (tenant_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING *
), submitted AS (
    INSERT INTO job_events (job_id, from_status, to_status, attempt, reason, actor)
    SELECT id, NULL, 'queued', 0, 'submitted', 'api' FROM job
)
SELECT * FROM job
""")


# How often a claim whose connection broke is read back (and tried again) before giving up.
CLAIM_RECOVERY_ATTEMPTS = 4
# How often claim_next tries again when its message's job was within every limit but its
# row was held (10, 20, 40, 80 ms apart).
CLAIM_HELD_ROW_RETRIES = 4
# A cancel tries this long for the job's row (ms); see Ledger.request_cancel.
CANCEL_LOCK_WAIT_MS = 1000
LOCK_NOT_AVAILABLE = "55P03"


class IdempotencyConflict(Exception):
    """The Idempotency-Key was already used by this tenant for a different request."""

    def __init__(self, job_id) -> None:
        super().__init__("Idempotency-Key already used with a different request body")
        self.job_id = job_id


@dataclass(frozen=True)
class Claim:
    """A won claim: the job row and the fencing token of this run."""

    job: Row
    token: int


@dataclass(frozen=True)
class Heartbeat:
    cancel_requested: bool


def _notice(kind: str) -> ColumnElement:
    """NOTIFY of a changed job row, for RETURNING: delivered to listeners (the SSE
    stream) at commit, and only if the change commits."""
    return func.pg_notify(CHANNEL, func.concat(jobs.c.id, f":{kind}"))


def _transition_statement(change, *, actor: str, from_status, reason, to_status=None, worker=None,
                          audited=None, stderr_tail=None):
    """``change`` (an UPDATE of jobs) with its audit rows and NOTIFYs, as one statement.

    One round trip in autocommit instead of BEGIN, UPDATE, INSERT, COMMIT, and no
    transaction left open between them. Every changed row wakes its job's watchers and,
    unless ``audited`` rules it out (a change that kept the status), gets its
    ``job_events`` row, marked with ``actor``. ``from_status``, ``reason``, ``to_status``,
    ``worker``, ``stderr_tail`` and ``audited`` are plain values or functions of the changed
    row's columns (those of ``jobs``, plus any ``change`` already returns); by default the
    event records the row's new status and worker. Returns the changed rows (with their
    tenant's name), or none when ``change`` matched nothing — then nothing else happened.
    """
    changed = change.returning(*jobs.c, _notice("status").label("notified")).cte("changed")

    def value(given, default=None):
        given = default if given is None else given
        return given(changed.c) if callable(given) else literal(given)

    rows = select(
        changed.c.id, value(from_status), value(to_status, lambda row: row.status), changed.c.attempts,
        value(worker, lambda row: row.worker), value(reason), literal(actor),
        value(stderr_tail, lambda row: null()),
    )
    if audited is not None:
        rows = rows.where(audited(changed.c))
    audit = insert(events).from_select(
        ["job_id", "from_status", "to_status", "attempt", "worker", "reason", "actor", "stderr_tail"], rows,
    ).cte("audit")
    tenant_name = select(tenants.c.name).where(tenants.c.id == changed.c.tenant_id).scalar_subquery()
    return select(*(changed.c[column.name] for column in jobs.c), tenant_name.label("tenant_name")).add_cte(audit)


def _fenced(change):
    """``change`` restricted to the run holding the token: running, same attempt."""
    return change.where(jobs.c.id == bindparam("job_id"), jobs.c.status == "running",
                        jobs.c.attempts == bindparam("token"))


# Which job a claim takes (docs/ledger.md, "Fair share"). Every claim first locks the
# fleet row, then every tenant's usage row (in tenant order: the transitions' trigger takes
# the fleet row first too, so nothing deadlocks). Claims therefore take turns, and a locked
# row is read in its latest committed version even though the statement's snapshot is
# older: the counters the limits are checked against are exact, whatever the number of
# workers racing. Each tenant offers its next job (highest priority, then oldest due; a
# later job never overtakes it, so a big job is never starved by small ones), locked with
# SKIP LOCKED so that a job changed since the snapshot (claimed, cancelled) is re-checked
# and passed over. Waiting instead could deadlock: a stale head may be a job that is
# running by now, its row held by a transition waiting for the fleet row we hold. (A
# queued row held for a moment, e.g. by the publish stamp, is what claim_next's ``hint``
# retries cover.) Among
# the offers that fit every limit: highest priority, then the tenant using the smallest
# fraction of its slots, then the tenant served least recently (tenants at the same
# fraction take turns), then the oldest due. ``pin``: only that job (a claim by id).
_CHOOSE_SQL = """
WITH fleet AS MATERIALIZED (
    SELECT running_jobs FROM fleet_usage WHERE id = 1 FOR UPDATE
), usage AS MATERIALIZED (
    SELECT u.tenant_id, u.running_slots, coalesce(t.max_slots, :default_slots) AS max_slots,
           t.rate_per_min, u.last_started_at,
           (SELECT count(*) FROM unnest(u.recent_starts) s WHERE s > now() - interval '60 seconds') AS recent
      FROM tenant_usage u JOIN tenants t ON t.id = u.tenant_id
     WHERE (SELECT running_jobs FROM fleet) < coalesce(CAST(:max_running AS integer), 2147483647)
     ORDER BY u.tenant_id
       FOR UPDATE OF u
)
SELECT j.id
  FROM usage u
 CROSS JOIN LATERAL (
       SELECT q.id, q.priority, q.run_after, q.slots
         FROM jobs q
        WHERE q.tenant_id = u.tenant_id AND q.status = 'queued' AND q.run_after <= now()
          AND q.cancel_requested_at IS NULL
          AND (CAST(:pin AS uuid) IS NULL OR q.id = CAST(:pin AS uuid))
        ORDER BY q.priority DESC, q.run_after, q.id
        LIMIT 1
          FOR UPDATE SKIP LOCKED
       ) j
 WHERE (u.running_slots = 0 OR u.running_slots + j.slots <= u.max_slots)
   AND (u.rate_per_min IS NULL OR u.recent < u.rate_per_min)
 ORDER BY j.priority DESC, u.running_slots::float8 / u.max_slots, u.last_started_at NULLS FIRST,
          j.run_after, j.id
 LIMIT 1
"""
_CHOSEN = text(_CHOOSE_SQL).columns(jobs.c.id).cte("chosen")

# Built once: every job's run starts with it. A new attempt starts with no progress and
# no stderr: what the previous attempt showed would be read as this one's (its stderr
# tail stays on the audit row that ended it).
_CLAIM = _transition_statement(
    update(jobs)
    .where(
        jobs.c.id == _CHOSEN.c.id,
        jobs.c.status == "queued",
        jobs.c.run_after <= func.now(),
        jobs.c.cancel_requested_at.is_(None),
    )
    .values(
        status="running", attempts=jobs.c.attempts + 1, worker=bindparam("worker"),
        claim_id=bindparam("claim_id", type_=jobs.c.claim_id.type),
        started_at=func.now(), heartbeat_at=func.now(), updated_at=func.now(),
        finished_at=None, error_code=None, error_message=None, stderr_tail=None,
        progress_at=None, **{column: None for column in PROGRESS_COLUMNS.values()},
    ),
    actor="worker", from_status="queued", to_status="running", reason="claimed",
)


# What the completion copies from the last snapshot; percent and ETA end at 100 and 0.
_SNAPSHOT_KEYS = tuple(key for key in PROGRESS_COLUMNS if key not in ("percent", "eta_s"))


def _complete_statement():
    has_progress = bindparam("has_progress", type_=Boolean)
    snapshot = {
        column: case((has_progress, bindparam(f"p_{key}", type_=jobs.c[column].type)), else_=jobs.c[column])
        for key, column in PROGRESS_COLUMNS.items() if key in _SNAPSHOT_KEYS
    }
    duration = func.coalesce(bindparam("media_duration_s", type_=Double), jobs.c.media_duration_s)
    return _transition_statement(
        _fenced(update(jobs))
        .values(
            status="completed", result=bindparam("result", type_=JSONB), finished_at=func.now(),
            updated_at=func.now(), heartbeat_at=func.now(), media_duration_s=duration,
            progress_at=case((has_progress, func.now()), else_=jobs.c.progress_at),
            **snapshot,
            # Percent and ETA end at 100 and 0 where progress was measurable at all.
            progress_percent=case(
                ((has_progress | jobs.c.progress_percent.is_not(None) | duration.is_not(None)), 100.0)),
            progress_eta_s=case(((has_progress | jobs.c.progress_at.is_not(None)), 0.0)),
        ),
        actor="worker", from_status="running", to_status="completed", reason="completed",
    )


# Built once: every job's run ends with it.
_COMPLETE = _complete_statement()


def _heartbeat_statement():
    """The fenced heartbeat, every optional part switched by a boolean parameter.

    Built once: a run writes it every progress interval, and building it per call (≈ 1.8 ms
    of SQLAlchemy construction and cache-key work) cost more than the round trip. It
    touches only unindexed columns (an unchanged value counts as untouched), so PostgreSQL
    can keep it a HOT update; the NOTIFY fires only for a write that carries progress.
    """
    has_progress = bindparam("has_progress", type_=Boolean)
    placing = bindparam("placing_outputs", type_=Boolean)
    progress = {
        column: case((has_progress, bindparam(f"p_{key}", type_=jobs.c[column].type)), else_=jobs.c[column])
        for key, column in PROGRESS_COLUMNS.items()
    }
    return (
        _fenced(update(jobs))
        .values(
            heartbeat_at=func.now(), updated_at=func.now(),
            progress_at=case((has_progress, func.now()), else_=jobs.c.progress_at), **progress,
            media_duration_s=func.coalesce(bindparam("media_duration_s", type_=Double), jobs.c.media_duration_s),
            outputs_placed_attempt=case((placing, bindparam("token")), else_=jobs.c.outputs_placed_attempt),
            result=case((bindparam("has_result", type_=Boolean), bindparam("placed_result", type_=JSONB)),
                        else_=jobs.c.result),
        )
        .returning(jobs.c.cancel_requested_at, case((has_progress, _notice("progress"))))
    )


_HEARTBEAT = _heartbeat_statement()


@dataclass(frozen=True)
class ProbeKey:
    """What a cached probe is valid for: a tenant's file as ``stat`` saw it, probed so (with
    object storage, its object as a HEAD saw it: ``worker.object_probe_key``)."""

    path: str          # relative to the tenant's directory
    size_bytes: int
    mtime_ns: int
    ctime_ns: int      # a file whose mtime was set back still has a new ctime
    inode: int         # a file replaced by a rename has another inode
    options: str       # how ffprobe ran (binary, demuxer whitelist, hashes)


_PROBE_KEY_COLUMNS = ("size_bytes", "mtime_ns", "ctime_ns", "inode", "options")
_CACHED_PROBES = select(
    probe_cache.c.path, probe_cache.c.probe, *(probe_cache.c[column] for column in _PROBE_KEY_COLUMNS),
).where(
    probe_cache.c.tenant_id == bindparam("tenant_id"), probe_cache.c.path.in_(bindparam("paths", expanding=True)),
)
def _store_probe_statement():
    """Insert or replace a path's probe: one row per (tenant, path), whatever it held before."""
    statement = pg_insert(probe_cache).values(
        tenant_id=bindparam("tenant_id"), path=bindparam("path"), probe=bindparam("probe", type_=JSONB),
        **{column: bindparam(column) for column in _PROBE_KEY_COLUMNS},
    )
    return statement.on_conflict_do_update(
        index_elements=[probe_cache.c.tenant_id, probe_cache.c.path],
        set_={**{c: statement.excluded[c] for c in (*_PROBE_KEY_COLUMNS, "probe")}, "probed_at": func.now()},
    )


_STORE_PROBE = _store_probe_statement()


def _fail_statement():
    """running → queued (a transient failure with attempts left, after the backoff) or
    failed; cancelled whatever the failure when a cancel was requested: the user asked
    the job to end, and a requeued job with a pending cancel is never claimed again."""
    cancelled = jobs.c.cancel_requested_at.is_not(None)
    retry = and_(~cancelled, bindparam("retryable", type_=Boolean), jobs.c.attempts < jobs.c.max_attempts)
    code, message = bindparam("code"), bindparam("message")
    return _transition_statement(
        _fenced(update(jobs))
        .values(
            status=case((cancelled, "cancelled"), (retry, "queued"), else_="failed"),
            run_after=case((retry, func.now() + _RETRY_DELAY), else_=jobs.c.run_after),
            finished_at=case((retry, None), else_=func.now()),
            dispatched_at=case((retry, None), else_=jobs.c.dispatched_at),
            heartbeat_at=case((retry, None), else_=jobs.c.heartbeat_at),
            error_code=case((cancelled, "cancelled"), else_=code),
            error_message=case((cancelled, "cancelled while running"), else_=message),
            stderr_tail=bindparam("stderr_tail"), updated_at=func.now(),
        ),
        actor="worker", from_status="running",
        # The failure that ended the run stays on the audit row, also when the job ends cancelled.
        reason=lambda row: case((row.status == "cancelled", func.concat("cancel requested; the run ended with ",
                                                                        code, ": ", message)),
                                else_=func.concat(code, ": ", message)),
        stderr_tail=lambda row: row.stderr_tail,
    )


_FAIL = _fail_statement()

_RECORD_CANCELLED = _transition_statement(
    _fenced(update(jobs))
    .where(jobs.c.cancel_requested_at.is_not(None))
    .values(
        status="cancelled", finished_at=func.now(), updated_at=func.now(),
        error_code="cancelled", error_message="cancelled while running",
    ),
    actor="worker", from_status="running", to_status="cancelled", reason="cancel requested",
)


def _cancel_statement(*match):
    """queued → cancelled with its audit row; a running job only gets the flag (its worker
    stops at its next heartbeat) and the NOTIFY that shows the request to its watchers.
    ``match``: which jobs (one by id, or a batch of the dashboard's bulk cancel); binds
    ``reason``."""
    was_queued = jobs.c.status == "queued"
    return _transition_statement(
        update(jobs)
        .where(*match, jobs.c.status.in_(("queued", "running")))
        .values(
            cancel_requested_at=func.coalesce(jobs.c.cancel_requested_at, func.now()),
            status=case((was_queued, "cancelled"), else_=jobs.c.status),
            finished_at=case((was_queued, func.now()), else_=jobs.c.finished_at),
            error_code=case((was_queued, "cancelled"), else_=jobs.c.error_code),
            error_message=case((was_queued, bindparam("reason")), else_=jobs.c.error_message),
            updated_at=func.now(),
        ),
        # A queued job has no run: its worker column may name an earlier, failed one.
        actor="api", from_status="queued", to_status="cancelled", worker=lambda row: null(),
        reason=lambda row: row.error_message, audited=lambda row: row.status == "cancelled",
    )


def _request_cancel_statement():
    """One tenant's cancel of one job, without waiting behind another session's row lock."""
    # "tenant", not "tenant_id": a bind parameter named after a column would become a SET value.
    mine = (jobs.c.id == bindparam("job_id"), jobs.c.tenant_id == bindparam("tenant"),
            jobs.c.status.in_(("queued", "running")))
    # NOWAIT: a row held by another session raises lock_not_available at once instead of
    # queueing the request behind it (see Ledger.request_cancel).
    locked = select(jobs.c.id).where(*mine).with_for_update(nowait=True).scalar_subquery()
    return _cancel_statement(jobs.c.id == locked, *mine)


_REQUEST_CANCEL = _request_cancel_statement()

RETRYABLE_STATUSES = ("failed", "cancelled")
RETRY_REASON = "retried by request"


def _retry_statement(chosen):
    """failed | cancelled → queued for the jobs ``chosen`` selects (their ids, locked), each
    with its audit row and NOTIFY. The same job runs again: ``attempts`` keeps counting (it
    is the fencing token, and the next claim must not reuse a finished run's number),
    ``max_attempts`` becomes ``attempts + allowance``; the previous error stays until the
    next run ends. Binds ``allowance``."""
    old = chosen.add_columns(jobs.c.status).cte("old")
    return _transition_statement(
        update(jobs)
        .where(jobs.c.id == old.c.id, jobs.c.status.in_(RETRYABLE_STATUSES))
        .values(
            status="queued", max_attempts=jobs.c.attempts + bindparam("allowance"),
            run_after=func.now(), dispatched_at=None, heartbeat_at=None, finished_at=None,
            cancel_requested_at=None, result=None, updated_at=func.now(), progress_at=None,
            **{column: None for column in PROGRESS_COLUMNS.values()},
        )
        # RETURNING gives the new row; the status it left comes from the locked read.
        .returning(old.c.status.label("retried_from")),
        actor="api", from_status=lambda row: row.retried_from, to_status="queued", worker=lambda row: null(),
        reason=RETRY_REASON,
    )


# "tenant_match", not "tenant_id": see _REQUEST_CANCEL. NULL: an operator's retry, any tenant.
_RETRY = _retry_statement(
    select(jobs.c.id)
    .where(jobs.c.id == bindparam("job_id"), jobs.c.status.in_(RETRYABLE_STATUSES),
           bindparam("any_tenant", type_=Boolean) | (jobs.c.tenant_id == bindparam("tenant_match")))
    .with_for_update()
)


def _reap_statement():
    """Every stale running job, in one statement: back to queued (after the backoff) while
    attempts remain, else failed with ``stale``; cancelled if a cancel was pending. Jobs
    locked by a writer are skipped: they are not silent, and a concurrent reaper must not
    wait for them."""
    stale = (
        select(jobs.c.id)
        .where(jobs.c.status == "running",
               is_stale(jobs.c.heartbeat_at, bindparam("stale_after_s", type_=Double)))
        .with_for_update(skip_locked=True)
        .cte("stale")
    )
    retry = _REAP_OUTCOME == "queued"
    reason = func.concat("stale: no heartbeat for ", func.round(
        func.extract("epoch", func.now() - jobs.c.heartbeat_at)), " s")
    return _transition_statement(
        update(jobs)
        .where(jobs.c.id == stale.c.id, jobs.c.status == "running")
        .values(
            status=_REAP_OUTCOME,
            run_after=case((retry, func.now() + _RETRY_DELAY), else_=jobs.c.run_after),
            finished_at=case((retry, None), else_=func.now()),
            heartbeat_at=case((retry, None), else_=jobs.c.heartbeat_at),
            dispatched_at=case((retry, None), else_=jobs.c.dispatched_at),
            error_code=case((_REAP_OUTCOME == "cancelled", "cancelled"), else_="stale"),
            error_message=reason, updated_at=func.now(),
        ),
        actor="reaper", from_status="running", reason=lambda row: row.error_message,
    )


_REAP = _reap_statement()


WAITING_REASONS = ("backoff", "tenant_limit", "rate_limit", "global_limit", "workers_busy")


def waiting_expression(default_slots: int, max_running: int | None) -> ColumnElement:
    """Why a job waits: NULL unless queued, else the first that applies of
    ``WAITING_REASONS``, judged as the claim judges (``_CHOOSE_SQL``) on the counters now."""
    global_limit = ("" if max_running is None else
                    f"WHEN (SELECT running_jobs FROM fleet_usage WHERE id = 1) >= {int(max_running)} "
                    "THEN 'global_limit'")
    return literal_column(f"""CASE WHEN jobs.status <> 'queued' THEN NULL
        WHEN jobs.run_after > now() THEN 'backoff'
        ELSE (SELECT CASE
            WHEN u.running_slots > 0 AND u.running_slots + jobs.slots > coalesce(t.max_slots, {int(default_slots)})
                THEN 'tenant_limit'
            WHEN t.rate_per_min IS NOT NULL AND (SELECT count(*) FROM unnest(u.recent_starts) s
                                                  WHERE s > now() - interval '60 seconds') >= t.rate_per_min
                THEN 'rate_limit'
            {global_limit}
            ELSE 'workers_busy' END
          FROM tenant_usage u JOIN tenants t ON t.id = u.tenant_id WHERE u.tenant_id = jobs.tenant_id)
        END""")


class Ledger:
    def __init__(self, engine: Engine, *, tenant_max_slots: int = 5, max_running: int | None = None) -> None:
        self.engine = engine
        # The limits of tenants without their own, and of the fleet (None: none); see claim.
        self.tenant_max_slots = tenant_max_slots
        self.max_running = max_running
        self.waiting = waiting_expression(tenant_max_slots, max_running)
        # What reads return: the row, its tenant's name and why it waits.
        self._read = (*_RETURNING, self.waiting.label("waiting"))

    def _autocommit(self) -> Connection:
        """A connection whose every statement commits on its own: for single-statement writes."""
        return self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")

    # -- submission -------------------------------------------------------

    def create(
        self,
        *,
        tenant_id,
        kind: str,
        spec: dict,
        workspace: str,
        priority: int,
        metadata: dict,
        max_attempts: int,
        timeout_s: int,
        idempotency_key: str | None = None,
        request_sha256: str | None = None,
        webhook_url: str | None = None,
        slots: int = 1,
    ) -> tuple[Row, bool]:
        """Insert a queued job; returns (job, created).

        With an idempotency key the unique index decides, not a read first:
        concurrent identical submissions all get the one row back.
        """
        values = dict(
            id=uuid.uuid4(), tenant_id=tenant_id, kind=kind, spec=spec, workspace=workspace,
            priority=priority, metadata=metadata, max_attempts=max_attempts, timeout_s=timeout_s,
            idempotency_key=idempotency_key, request_sha256=request_sha256, webhook_url=webhook_url,
            slots=slots,
        )
        # One statement in autocommit: one round trip, and the rows the events trigger locks
        # (the transition totals) stay locked while PostgreSQL commits, not across round trips.
        with self._autocommit() as conn:
            row = conn.execute(_SUBMIT, values).mappings().first()
            if row is not None:
                return dict(row), True
            existing = conn.execute(
                select(*_RETURNING).where(
                    jobs.c.tenant_id == tenant_id, jobs.c.idempotency_key == idempotency_key
                )
            ).mappings().one()
        if existing["request_sha256"] != request_sha256:
            raise IdempotencyConflict(existing["id"])
        return dict(existing), False

    def create_many(self, *, tenant_id, jobs_values: list[dict], idempotency_key: str | None = None,
                    request_sha256: str | None = None) -> tuple[list[Row], bool]:
        """Insert a batch of queued jobs, with their ``submitted`` events, in one statement;
        returns (jobs in the given order, created).

        ``jobs_values``: per job the columns ``create`` takes. With an idempotency key the
        batch is one request: job ``i`` carries the key ``batch:<i>:<key>`` and the whole
        batch's fingerprint, so a replay inserts nothing and gets the same jobs back, and
        the key with another body raises IdempotencyConflict.
        """
        # Ids in ascending order: the batch shares one due time, and the claim breaks that tie
        # by id, so the jobs start in request order.
        ids = sorted(uuid.uuid4() for _ in jobs_values)
        keys = ([f"batch:{index}:{idempotency_key}" for index in range(len(jobs_values))]
                if idempotency_key is not None else [None] * len(jobs_values))
        params = {
            "tenant_id": tenant_id, "request_sha256": request_sha256 if idempotency_key is not None else None,
            "ids": ids, "keys": keys,
            **{name: [values.get(name, default) for values in jobs_values]
               for name, default in (("kind", None), ("workspace", None), ("priority", 0), ("max_attempts", 1),
                                     ("timeout_s", 1), ("webhook_url", None), ("slots", 1))},
            "spec": [json.dumps(values["spec"]) for values in jobs_values],
            "metadata": [json.dumps(values.get("metadata") or {}) for values in jobs_values],
        }
        with self._autocommit() as conn:
            inserted = {row["id"]: dict(row) for row in conn.execute(_SUBMIT_MANY, params).mappings()}
            if len(inserted) == len(ids):
                return [inserted[job_id] for job_id in ids], True
            existing = {r["idempotency_key"]: dict(r) for r in conn.execute(
                select(*_RETURNING).where(jobs.c.tenant_id == tenant_id, jobs.c.idempotency_key.in_(keys))
            ).mappings()} if idempotency_key is not None else {}
        if (inserted or len(existing) != len(keys)
                or any(r["request_sha256"] != request_sha256 for r in existing.values())):
            raise IdempotencyConflict(next(iter(existing.values()))["id"] if existing else None)
        return [existing[key] for key in keys], False

    def unpublished(self, job_ids) -> None:
        """Take back the publish a submission counted (``_PUBLISHED_AT_SUBMISSION``) when its
        message never reached the broker: the re-dispatcher then sends it soon."""
        with self._autocommit() as conn:
            conn.execute(
                update(jobs).where(jobs.c.id.in_(list(job_ids)), jobs.c.status == "queued",
                                   jobs.c.dispatch_count == 1)
                .values(dispatched_at=None, dispatch_count=0)
            )

    def why_waiting(self, job_ids) -> dict:
        """``waiting`` of the given jobs (id → reason or None), as reads show it."""
        if not job_ids:
            return {}
        with self.engine.connect() as conn:
            return {row.id: row.waiting for row in conn.execute(
                select(jobs.c.id, self.waiting.label("waiting")).where(jobs.c.id.in_(list(job_ids))))}

    def slots_of(self, tenant_id) -> int:
        """The running slots a tenant may use."""
        with self.engine.connect() as conn:
            own = conn.execute(select(tenants.c.max_slots).where(tenants.c.id == tenant_id)).scalar()
        return own or self.tenant_max_slots

    def limits(self, tenant_id) -> dict:
        """A tenant's limits and what it uses now, and the fleet's (GET /v1/limits)."""
        query = text("""
            SELECT t.max_slots, t.rate_per_min, u.running_slots, u.running_jobs,
                   (SELECT count(*) FROM unnest(u.recent_starts) s WHERE s > now() - interval '60 seconds')
                       AS started_last_60s,
                   (SELECT running_jobs FROM fleet_usage WHERE id = 1) AS fleet_running,
                   (SELECT count(*) FROM jobs WHERE tenant_id = t.id AND status = 'queued') AS queued
              FROM tenants t JOIN tenant_usage u ON u.tenant_id = t.id WHERE t.id = :tenant""")
        with self.engine.connect() as conn:
            row = conn.execute(query, {"tenant": tenant_id}).mappings().one()
        return {
            "slots": {"limit": row["max_slots"] or self.tenant_max_slots, "default": row["max_slots"] is None,
                      "used": row["running_slots"]},
            "rate_per_min": {"limit": row["rate_per_min"],
                             "started_last_60s": row["started_last_60s"] if row["rate_per_min"] else None},
            "running_jobs": row["running_jobs"],
            "queued_jobs": row["queued"],
            "fleet": {"max_running": self.max_running, "running_jobs": row["fleet_running"]},
        }

    def mark_dispatched(self, job_id) -> bool:
        """Stamp a publish of the job's message (bookkeeping for re-dispatch)."""
        with self._autocommit() as conn:
            return conn.execute(_MARK_DISPATCHED, {"job_id": job_id}).rowcount == 1

    # -- a run: claim, heartbeat, finish -----------------------------------

    def claim_next(self, worker: str, *, hint=None) -> Claim:
        """Claim the best eligible job (see ``_CHOOSE_SQL``); NotClaimable with reason
        ``none_eligible`` when nothing queued and due fits the limits now.

        ``hint``: the job the message was published for. When nothing was claimed although
        that job is queued and within every limit (``waiting`` is ``workers_busy``), its row
        was held for a moment (the API stamps the publish right after sending the message,
        and the claim skips held rows): the claim is tried again a few times, briefly,
        rather than drop the job's only message.
        """
        for attempt in range(CLAIM_HELD_ROW_RETRIES + 1):
            try:
                return self._claim(None, worker)
            except NotClaimable:
                if (hint is None or attempt == CLAIM_HELD_ROW_RETRIES
                        or self.why_waiting([hint]).get(_as_uuid(hint)) != "workers_busy"):
                    raise
            time.sleep(0.01 * 2 ** attempt)
        raise AssertionError("unreachable")

    def claim(self, job_id, worker: str) -> Claim:
        """Claim this job, if it is queued, due, not cancelled and fits its limits."""
        return self._claim(job_id, worker)

    def _claim(self, pin, worker: str) -> Claim:
        """queued → running; the new attempt is the token. One statement.

        The claim writes a fresh ``claim_id``. When the connection breaks before the
        reply arrives, the claim may or may not have committed: the row carrying this
        claim's id is looked up, and if it is running the run is ours (else the claim is
        tried again, a few times, before the error is raised). A lost reply must not burn
        an attempt, nor hold a slot with no run behind it.
        """
        params = {"pin": pin, "worker": worker, "claim_id": uuid.uuid4(),
                  "default_slots": self.tenant_max_slots, "max_running": self.max_running}
        for attempt in range(CLAIM_RECOVERY_ATTEMPTS):
            try:
                with self._autocommit() as conn:
                    row = conn.execute(_CLAIM, params).mappings().first()
                    if row is None and attempt > 0:  # did the try whose reply was lost commit?
                        row = self._own_claim(conn, params["claim_id"])
                    if row is None:
                        if pin is None:
                            raise NotClaimable(None, "no queued job is due and within its limits",
                                               reason="none_eligible")
                        raise self._not_claimable(conn, pin)
                return Claim(job=dict(row), token=row["attempts"])
            except OperationalError as exc:
                if not exc.connection_invalidated or attempt == CLAIM_RECOVERY_ATTEMPTS - 1:
                    raise
                time.sleep(0.1 * 2 ** attempt)
        raise AssertionError("unreachable")

    @staticmethod
    def _own_claim(conn: Connection, claim_id) -> Row | None:
        """The job claimed by ``claim_id``, if that claim committed and still runs."""
        return conn.execute(
            select(*_RETURNING).where(jobs.c.status == "running", jobs.c.claim_id == claim_id)
        ).mappings().first()

    @staticmethod
    def _not_claimable(conn: Connection, job_id) -> NotClaimable:
        """Why the claim matched nothing, in the database's own terms (its clock decides "due")."""
        row = conn.execute(
            select(jobs.c.status, jobs.c.cancel_requested_at,
                   func.extract("epoch", jobs.c.run_after - func.now()).label("due_in_s"))
            .where(jobs.c.id == job_id)
        ).first()
        if row is None:
            return NotClaimable(job_id, f"job {job_id} is not claimable (absent)", reason="absent")
        if row.status == "queued" and row.cancel_requested_at is None and row.due_in_s > 0:
            due_in_s = float(row.due_in_s)
            return NotClaimable(job_id, f"job {job_id} is queued but not due for {due_in_s:.3f} s",
                                reason="not_due", due_in_s=due_in_s)
        if row.status == "queued":
            return NotClaimable(job_id, f"job {job_id} is queued and waits for its limits", reason="waiting")
        return NotClaimable(job_id, f"job {job_id} is not claimable ({row.status})")

    def due_in_s(self, job_id) -> float | None:
        """How long until a queued job is due, by the database's clock; None when it is
        due, or not queued."""
        with self.engine.connect() as conn:
            return self._not_claimable(conn, job_id).due_in_s

    def heartbeat(
        self, job_id, token: int, progress: Mapping[str, Any] | None = None,
        *, media_duration_s: float | None = None, placing_outputs: bool = False,
        placed_result: dict | None = None,
    ) -> Heartbeat:
        """Fenced heartbeat, optionally carrying a progress snapshot (and its NOTIFY).

        ``placing_outputs`` records that this attempt is moving its outputs into place,
        with ``placed_result`` the result they make (kept in ``result``, which the API
        shows only once the job is completed): a later attempt that finds them intact
        completes with it instead of encoding again.

        Touches only unindexed columns so PostgreSQL can keep it a HOT update.
        """
        params = {
            "job_id": job_id, "token": token, "has_progress": progress is not None,
            "media_duration_s": media_duration_s, "placing_outputs": placing_outputs,
            "has_result": placing_outputs and placed_result is not None, "placed_result": placed_result,
            **{f"p_{key}": (progress or {}).get(key) for key in PROGRESS_COLUMNS},
        }
        with self._autocommit() as conn:
            row = conn.execute(_HEARTBEAT, params).first()
        if row is None:
            raise FencedOut(job_id, f"attempt {token} of job {job_id} no longer owns it")
        return Heartbeat(cancel_requested=row.cancel_requested_at is not None)

    # -- probe cache ----------------------------------------------------------

    def cached_probes(self, tenant_id, keys: list[ProbeKey]) -> list[dict | None]:
        """The stored probe of each file whose stat and options still equal the key's, else None."""
        if not keys:
            return []
        with self._autocommit() as conn:
            rows = conn.execute(_CACHED_PROBES, {"tenant_id": tenant_id,
                                                 "paths": sorted({key.path for key in keys})}).mappings().all()
        stored = {(row["path"], *(row[c] for c in _PROBE_KEY_COLUMNS)): row["probe"] for row in rows}
        return [stored.get((key.path, *(getattr(key, c) for c in _PROBE_KEY_COLUMNS))) for key in keys]

    def store_probes(self, tenant_id, entries: list[tuple[ProbeKey, dict]]) -> None:
        """Keep each file's probe for its key, replacing what was stored for that path."""
        if not entries:
            return
        params = [{"tenant_id": tenant_id, "path": key.path, "probe": probe,
                   **{c: getattr(key, c) for c in _PROBE_KEY_COLUMNS}} for key, probe in entries]
        with self._autocommit() as conn:
            conn.execute(_STORE_PROBE, params)

    def complete(
        self, job_id, token: int, result: dict, *,
        media_duration_s: float | None = None, progress: Mapping[str, Any] | None = None,
    ) -> Row:
        """running → completed. Idempotent: repeating it for the same attempt changes nothing.

        ``progress`` is the run's last snapshot when no heartbeat carried it yet: the
        completion writes it too, sparing a short job one more UPDATE.
        """
        params = {
            "job_id": job_id, "token": token, "result": result, "media_duration_s": media_duration_s,
            "has_progress": progress is not None,
            **{f"p_{key}": (progress or {}).get(key) for key in _SNAPSHOT_KEYS},
        }
        with self._autocommit() as conn:
            row = conn.execute(_COMPLETE, params).mappings().first()
            if row is not None:
                return dict(row)
            current = self._get(conn, job_id)
        if current is not None and current["status"] == "completed" and current["attempts"] == token:
            return current
        raise FencedOut(job_id, f"attempt {token} of job {job_id} cannot complete it")

    def fail(
        self, job_id, token: int, *, code: str, message: str, stderr_tail: str | None = None,
        retryable: bool = False,
    ) -> Row:
        """running → queued (retryable and attempts left; the backoff grows with the
        attempt) or → failed."""
        params = {"job_id": job_id, "token": token, "code": code, "message": message,
                  "stderr_tail": stderr_tail, "retryable": retryable}
        with self._autocommit() as conn:
            row = conn.execute(_FAIL, params).mappings().first()
        if row is None:
            raise FencedOut(job_id, f"attempt {token} of job {job_id} cannot fail it")
        return dict(row)

    def record_cancelled(self, job_id, token: int) -> Row:
        """running → cancelled, once the run has killed its ffmpeg and cleaned up."""
        with self._autocommit() as conn:
            row = conn.execute(_RECORD_CANCELLED, {"job_id": job_id, "token": token}).mappings().first()
        if row is None:
            raise FencedOut(job_id, f"attempt {token} of job {job_id} cannot record its cancel")
        return dict(row)

    # -- maintenance (beat) --------------------------------------------------

    def reap_stale(self, conn: Connection, stale_after_s: float, *, dry_run: bool = False) -> list[Row]:
        """Running jobs whose heartbeat is older than ``stale_after_s``: back to queued
        (with backoff) while attempts remain, else failed with ``stale``; a stale job whose
        cancel was requested becomes cancelled. One statement, in the caller's transaction
        (the reaper holds its lock there). Returns one row per decision.
        """
        if dry_run:
            query = select(
                jobs.c.id, jobs.c.attempts, jobs.c.max_attempts, jobs.c.worker, jobs.c.heartbeat_at,
                (func.now() - jobs.c.heartbeat_at).label("silent_for"), _REAP_OUTCOME.label("to_status"),
            ).where(jobs.c.status == "running", is_stale(jobs.c.heartbeat_at, stale_after_s))
            return [dict(r) for r in conn.execute(query).mappings()]
        return [dict(r) for r in conn.execute(_REAP, {"stale_after_s": stale_after_s}).mappings()]

    def due_for_dispatch(self, redispatch_after_s: float, *, never_published_after_s: float,
                         max_wait_s: float, limit: int) -> list:
        """Queued, due jobs whose last publish is old enough to count as lost.

        The wait doubles with each publish (capped at ``max_wait_s``), so a long,
        legitimate backlog is not flooded with duplicates. A job never published (the
        publish failed right after commit) is due ``never_published_after_s`` after its
        last change.
        """
        # A publish with a countdown only fires at run_after: count from whichever is later.
        waited = func.now() - case(
            (jobs.c.dispatched_at.is_(None), jobs.c.updated_at),
            else_=func.greatest(jobs.c.dispatched_at, jobs.c.run_after),
        )
        threshold = case(
            (jobs.c.dispatched_at.is_(None), seconds(never_published_after_s)),
            else_=seconds(func.least(
                max_wait_s, redispatch_after_s * func.power(2, func.least(jobs.c.dispatch_count - 1, 6))
            )),
        )
        query = (
            select(jobs.c.id)
            .where(jobs.c.status == "queued", jobs.c.run_after <= func.now(),
                   jobs.c.cancel_requested_at.is_(None), waited > threshold)
            .order_by(jobs.c.priority.desc(), jobs.c.run_after)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return list(conn.execute(query).scalars())

    def prune(self, retention_days: int, *, batch: int) -> int:
        """Delete one batch of terminal jobs older than the retention (events cascade)."""
        doomed = (
            select(jobs.c.id)
            .where(jobs.c.status.in_(TERMINAL_STATUSES),
                   jobs.c.finished_at < func.now() - days(retention_days))
            .limit(batch)
            .with_for_update(skip_locked=True)
        )
        with self.engine.begin() as conn:
            return conn.execute(delete(jobs).where(jobs.c.id.in_(doomed.scalar_subquery()))).rowcount

    def prune_probes(self, retention_days: int, *, batch: int) -> int:
        """Delete one batch of probe cache entries stored more than the retention ago: a file
        deleted or never read again leaves its entry behind, and one still in use is probed
        once more, which stores it afresh."""
        doomed = (
            select(probe_cache.c.tenant_id, probe_cache.c.path)
            .where(probe_cache.c.probed_at < func.now() - days(retention_days))
            .limit(batch)
            .with_for_update(skip_locked=True)
        )
        with self.engine.begin() as conn:
            return conn.execute(delete(probe_cache).where(
                tuple_(probe_cache.c.tenant_id, probe_cache.c.path).in_(doomed))).rowcount

    def running_attempts(self, job_ids) -> set[tuple[str, int]]:
        """(job id, attempt) of the given jobs that are running now."""
        if not job_ids:
            return set()
        query = select(jobs.c.id, jobs.c.attempts).where(jobs.c.id.in_(job_ids), jobs.c.status == "running")
        with self.engine.connect() as conn:
            return {(str(row.id), row.attempts) for row in conn.execute(query)}

    # -- requests from the API --------------------------------------------

    def request_cancel(self, job_id, tenant_id, reason: str = "cancelled by request") -> Row:
        """Queued → cancelled at once; running → flagged for its worker to stop.

        One statement; only when it matched nothing does a read say why: JobNotFound
        (absent or another tenant's) or AlreadyTerminal. The statement does not wait for
        the job's row: every ledger write holds it for one statement (milliseconds), so
        a row still held after ``CANCEL_LOCK_WAIT_MS`` of short retries belongs to a
        frozen session, and the request answers JobBusy rather than queue behind it
        until the server ends that session (``idle_in_transaction_session_timeout``,
        ffworker.db).
        """
        params = {"job_id": job_id, "tenant": tenant_id, "reason": reason}
        give_up_at = time.monotonic() + CANCEL_LOCK_WAIT_MS / 1000
        pause_s = 0.02
        while True:
            try:
                with self._autocommit() as conn:
                    row = conn.execute(_REQUEST_CANCEL, params).mappings().first()
                    if row is not None:
                        return dict(row)
                    current = self._get(conn, job_id)
                break
            except OperationalError as exc:
                if getattr(exc.orig, "sqlstate", None) != LOCK_NOT_AVAILABLE:
                    raise
                if time.monotonic() + pause_s > give_up_at:
                    raise JobBusy(job_id, "the job is being updated by another session; retry shortly") from None
                time.sleep(pause_s)
                pause_s = min(0.2, pause_s * 2)
        if current is None or current["tenant_id"] != tenant_id:
            raise JobNotFound(job_id, "job not found")
        raise AlreadyTerminal(job_id, f"job is already {current['status']}")

    # -- reads --------------------------------------------------------------

    def get(self, job_id, tenant_id=None) -> Row | None:
        with self.engine.connect() as conn:
            row = self._get(conn, job_id)
        if row is None or (tenant_id is not None and row["tenant_id"] != tenant_id):
            return None
        return row

    def list(
        self, tenant_id, *, limit: int, status=None, kind=None, workspace=None,
        created_after=None, created_before=None, before: tuple | None = None,
    ) -> list[Row]:
        """A tenant's jobs, newest first; ``before`` is the (created_at, id) keyset cursor."""
        query = select(*self._read).where(jobs.c.tenant_id == tenant_id)
        for column, value in ((jobs.c.status, status), (jobs.c.kind, kind), (jobs.c.workspace, workspace)):
            if value is not None:
                query = query.where(column == value)
        if created_after is not None:
            query = query.where(jobs.c.created_at > created_after)
        if created_before is not None:
            query = query.where(jobs.c.created_at < created_before)
        if before is not None:
            query = query.where(tuple_(jobs.c.created_at, jobs.c.id) < tuple_(*before))
        query = query.order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit)
        with self.engine.connect() as conn:
            return [dict(row) for row in conn.execute(query).mappings()]

    def events(self, job_id, after_id: int = 0) -> list[Row]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(events).where(events.c.job_id == job_id, events.c.id > after_id).order_by(events.c.id)
            ).mappings().all()
        return [dict(r) for r in rows]

    def _get(self, conn: Connection, job_id) -> Row | None:
        row = conn.execute(select(*self._read).where(jobs.c.id == job_id)).mappings().first()
        return dict(row) if row is not None else None

    @staticmethod
    def _status(conn: Connection, job_id) -> str:
        status = conn.execute(select(jobs.c.status).where(jobs.c.id == job_id)).scalar()
        return status or "absent"

    def job_with_events(self, job_id) -> tuple[Row | None, list[Row]]:
        """The job and all its audit events, read from one snapshot (the SSE stream's view)."""
        with self.engine.connect() as conn:
            conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                row = self._get(conn, job_id)
                if row is None:
                    return None, []
                rows = conn.execute(
                    select(events).where(events.c.job_id == job_id).order_by(events.c.id)
                ).mappings().all()
        return row, [dict(r) for r in rows]

    # -- retry and bulk actions (the dashboard, POST /v1/jobs/{id}/retry) -----------------

    def retry(self, job_id, tenant_id, allowance: int) -> Row:
        """failed | cancelled → queued: the same job again, with ``allowance`` more runs.

        ``tenant_id`` None: any tenant's job (an operator). One statement; only when it
        matched nothing does a read say why: JobNotFound (absent or another tenant's) or
        NotRetryable.
        """
        params = {"job_id": job_id, "any_tenant": tenant_id is None, "tenant_match": tenant_id,
                  "allowance": allowance}
        with self._autocommit() as conn:
            row = conn.execute(_RETRY, params).mappings().first()
            if row is not None:
                return dict(row)
            current = self._get(conn, job_id)
        if current is None or (tenant_id is not None and current["tenant_id"] != tenant_id):
            raise JobNotFound(job_id, "job not found")
        raise NotRetryable(job_id, f"job is {current['status']}: only failed or cancelled jobs can be retried")

    def retry_matching(self, filters: Mapping[str, Any], allowance: int, *, batch: int = 500) -> list:
        """Retry every failed or cancelled job matching ``filters`` (see ``job_filter``), one
        statement per batch of ``batch`` jobs; returns the ids of the jobs re-queued. Rows
        another transaction holds are skipped, not waited for."""
        chosen = (select(jobs.c.id).where(*job_filter(**filters), jobs.c.status.in_(RETRYABLE_STATUSES))
                  .limit(batch).with_for_update(skip_locked=True))
        return self._in_batches(_retry_statement(chosen), {"allowance": allowance}, batch)

    def cancel_matching(self, filters: Mapping[str, Any], *, batch: int = 500,
                        reason: str = "cancelled by request") -> list:
        """Cancel every queued or running job matching ``filters``, one statement per batch:
        queued ones become cancelled at once (with their audit row), running ones are flagged
        for their worker (which records ``cancelled``). Returns the ids acted on."""
        chosen = (
            select(jobs.c.id)
            .where(*job_filter(**filters),
                   (jobs.c.status == "queued")
                   | and_(jobs.c.status == "running", jobs.c.cancel_requested_at.is_(None)))
            .limit(batch).with_for_update(skip_locked=True)
            .cte("chosen")
        )
        return self._in_batches(_cancel_statement(jobs.c.id == chosen.c.id), {"reason": reason}, batch)

    def _in_batches(self, statement, params: dict, batch: int) -> list:
        """Run ``statement`` until a batch comes back short: each run acts on rows the
        previous ones left (re-queued, cancelled or flagged rows no longer match)."""
        done: list = []
        with self._autocommit() as conn:
            while True:
                ids = [row.id for row in conn.execute(statement, params)]
                done.extend(ids)
                if len(ids) < batch:
                    return done


def _as_uuid(value) -> uuid.UUID | None:
    try:
        return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
    except ValueError:
        return None


def job_filter(*, tenant_id=None, status=None, kind=None, workspace=None, created_after=None,
               created_before=None, as_of=None) -> list:
    """The conditions of a job listing's filters (the REST names); ``as_of``: created no later."""
    conditions = []
    for column, value in ((jobs.c.tenant_id, tenant_id), (jobs.c.status, status), (jobs.c.kind, kind),
                          (jobs.c.workspace, workspace)):
        if value is not None:
            conditions.append(column == value)
    if created_after is not None:
        conditions.append(jobs.c.created_at > created_after)
    if created_before is not None:
        conditions.append(jobs.c.created_at < created_before)
    if as_of is not None:
        conditions.append(jobs.c.created_at <= as_of)
    return conditions

