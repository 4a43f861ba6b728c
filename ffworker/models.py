"""The job ledger's tables.

Named and typed for people who write SQL against them: timestamps with time
zone, status and kind as constrained text, progress as plain numeric columns.
The schema itself is created by the alembic migrations; these models are what
the migrations must equal (tests/integration/test_migrations.py checks it).
"""
from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Double,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, TIMESTAMP, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

JOB_STATUSES = ("queued", "running", "completed", "failed", "cancelled")
TERMINAL_STATUSES = ("completed", "failed", "cancelled")
# The NOTIFY channel of every ledger write that a job's watchers care about.
NOTIFY_CHANNEL = "ffworker_jobs"
JOB_KINDS = ("probe", "transcode", "thumbnail", "concat", "hls", "command")
# Who made a transition (job_events.actor): the metrics tell the reaper's apart by it.
ACTORS = ("api", "worker", "reaper")

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

TZ = TIMESTAMP(timezone=True)


def _in_list(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[uuid.UUID] = mapped_column(UUID, primary_key=True, server_default=func.gen_random_uuid())
    name: Mapped[str] = mapped_column(Text, unique=True)
    created_at: Mapped[datetime] = mapped_column(TZ, server_default=func.now())
    # The tenant's limits (docs/ledger.md, "Fair share"). NULL: FFWORKER_TENANT_MAX_SLOTS;
    # no limit on starts.
    max_slots: Mapped[int | None] = mapped_column(Integer)
    rate_per_min: Mapped[int | None] = mapped_column(Integer)

    __table_args__ = (
        CheckConstraint(r"name ~ '^[a-z0-9][a-z0-9_-]{0,62}$'", name="name_format"),
        CheckConstraint("(max_slots IS NULL OR max_slots >= 1) AND (rate_per_min IS NULL OR rate_per_min >= 1)",
                        name="limits_valid"),
    )


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(UUID, primary_key=True, server_default=func.gen_random_uuid())
    tenant_id: Mapped[uuid.UUID] = mapped_column(UUID, ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(Text)
    key_sha256: Mapped[str] = mapped_column(Text, unique=True)
    created_at: Mapped[datetime] = mapped_column(TZ, server_default=func.now())
    revoked_at: Mapped[datetime | None] = mapped_column(TZ)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[uuid.UUID] = mapped_column(UUID, primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(UUID, ForeignKey("tenants.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text, server_default="queued")
    workspace: Mapped[str] = mapped_column(Text, server_default="default")
    priority: Mapped[int] = mapped_column(Integer, server_default="0")
    spec: Mapped[dict] = mapped_column(JSONB)
    job_metadata: Mapped[dict] = mapped_column("metadata", JSONB, server_default=text("'{}'::jsonb"))
    idempotency_key: Mapped[str | None] = mapped_column(Text)
    request_sha256: Mapped[str | None] = mapped_column(Text)

    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    # What the job costs its tenant's slots while it runs (from its kind, at submission).
    slots: Mapped[int] = mapped_column(Integer, server_default="1")
    max_attempts: Mapped[int] = mapped_column(Integer)
    timeout_s: Mapped[int] = mapped_column(Integer)
    worker: Mapped[str | None] = mapped_column(Text)

    created_at: Mapped[datetime] = mapped_column(TZ, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(TZ, server_default=func.now())
    run_after: Mapped[datetime] = mapped_column(TZ, server_default=func.now())
    dispatched_at: Mapped[datetime | None] = mapped_column(TZ)
    dispatch_count: Mapped[int] = mapped_column(Integer, server_default="0")
    started_at: Mapped[datetime | None] = mapped_column(TZ)
    heartbeat_at: Mapped[datetime | None] = mapped_column(TZ)
    finished_at: Mapped[datetime | None] = mapped_column(TZ)
    cancel_requested_at: Mapped[datetime | None] = mapped_column(TZ)
    # A random id per claim, so a worker whose claim reply was lost can recognise its own
    # claim on re-reading the row (host:pid alone could be an earlier run of the same pid).
    claim_id: Mapped[uuid.UUID | None] = mapped_column(UUID)
    # The attempt that began moving its outputs into place. A later attempt of
    # the same job (the earlier one died before recording completion) may
    # replace what that attempt placed: those files are this job's own.
    outputs_placed_attempt: Mapped[int | None] = mapped_column(Integer)
    # Where this job's terminal event is also sent (a webhook, see ffworker/delivery.py).
    webhook_url: Mapped[str | None] = mapped_column(Text)

    # Progress: rewritten every progress interval, so none of these (nor
    # heartbeat_at/updated_at) may appear in an index: the writes stay HOT.
    progress_at: Mapped[datetime | None] = mapped_column(TZ)
    progress_percent: Mapped[float | None] = mapped_column(Double)
    progress_frame: Mapped[int | None] = mapped_column(BigInteger)
    progress_fps: Mapped[float | None] = mapped_column(Double)
    progress_speed: Mapped[float | None] = mapped_column(Double)
    progress_out_time_s: Mapped[float | None] = mapped_column(Double)
    progress_eta_s: Mapped[float | None] = mapped_column(Double)

    media_duration_s: Mapped[float | None] = mapped_column(Double)
    result: Mapped[dict | None] = mapped_column(JSONB)
    error_code: Mapped[str | None] = mapped_column(Text)
    error_message: Mapped[str | None] = mapped_column(Text)
    stderr_tail: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        CheckConstraint(_in_list("status", JOB_STATUSES), name="status_valid"),
        CheckConstraint(_in_list("kind", JOB_KINDS), name="kind_valid"),
        CheckConstraint("attempts >= 0 AND max_attempts >= 1", name="attempts_valid"),
        CheckConstraint("slots >= 1", name="slots_valid"),
        # Nothing claims, re-dispatches or reaps a queued job whose cancel was requested:
        # such a row would wait forever, so no write may produce it.
        CheckConstraint("NOT (status = 'queued' AND cancel_requested_at IS NOT NULL)",
                        name="queued_not_cancel_requested"),
        # The tenant's job listing, newest first, keyset-paginated on (created_at, id).
        Index("ix_jobs_tenant_created", "tenant_id", text("created_at DESC"), text("id DESC")),
        Index("ix_jobs_tenant_workspace_created", "tenant_id", "workspace", text("created_at DESC"), text("id DESC")),
        # The listing filtered by status: one page read whatever the history. kind trails the
        # keys so a kind filter is checked in the index, not on the rows it rejects.
        Index("ix_jobs_tenant_status_created", "tenant_id", "status", text("created_at DESC"), text("id DESC"), "kind"),
        # Scans of the maintenance jobs: queued work to (re)dispatch, running work to reap.
        Index("ix_jobs_queued_run_after", "run_after", postgresql_where=text("status = 'queued'")),
        Index("ix_jobs_running_started", "started_at", postgresql_where=text("status = 'running'")),
        # The claim: each tenant's next job (highest priority, then oldest due), whatever the backlog.
        Index("ix_jobs_queued_tenant_next", "tenant_id", text("priority DESC"), "run_after", "id",
              postgresql_where=text("status = 'queued'")),
        # Retention prunes old terminal jobs.
        Index("ix_jobs_terminal_finished", "finished_at", postgresql_where=text(_in_list("status", TERMINAL_STATUSES))),
        Index(
            "uq_jobs_tenant_idempotency_key", "tenant_id", "idempotency_key", unique=True,
            postgresql_where=text("idempotency_key IS NOT NULL"),
        ),
    )


class JobEvent(Base):
    """Append-only audit of every status transition (and every reap decision)."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    job_id: Mapped[uuid.UUID] = mapped_column(UUID, ForeignKey("jobs.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(TZ, server_default=func.now())
    from_status: Mapped[str | None] = mapped_column(Text)
    to_status: Mapped[str] = mapped_column(Text)
    attempt: Mapped[int] = mapped_column(Integer)
    worker: Mapped[str | None] = mapped_column(Text)
    reason: Mapped[str | None] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(Text)
    # The end of ffmpeg's stderr of the attempt this transition ended (jobs.stderr_tail is
    # cleared by the next claim; this copy stays).
    stderr_tail: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        Index("ix_job_events_job_id_id", "job_id", "id"),
        CheckConstraint(_in_list("actor", ACTORS), name="actor_valid"),
    )


class FleetUsage(Base):
    """One row: running jobs across the fleet. Kept by the trigger of migration 0010; the
    claim locks it first (the global limit, and the fixed lock order)."""

    __tablename__ = "fleet_usage"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, server_default="1")
    running_jobs: Mapped[int] = mapped_column(Integer, server_default="0")


class TenantUsage(Base):
    """One row per tenant: what it runs now and when it last started jobs (the rate limit's
    window). Kept by the trigger of migration 0010 in each transition's own transaction."""

    __tablename__ = "tenant_usage"

    tenant_id: Mapped[uuid.UUID] = mapped_column(UUID, ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    running_jobs: Mapped[int] = mapped_column(Integer, server_default="0")
    running_slots: Mapped[int] = mapped_column(Integer, server_default="0")
    last_started_at: Mapped[datetime | None] = mapped_column(TZ)
    recent_starts: Mapped[list[datetime]] = mapped_column(ARRAY(TZ), server_default=text("'{}'"))


class MaintenanceState(Base):
    """One row per maintenance task (the reaper's grace period lives here)."""

    __tablename__ = "maintenance_state"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    last_run_at: Mapped[datetime | None] = mapped_column(TZ)
    armed_at: Mapped[datetime | None] = mapped_column(TZ)
    # When the reaper last armed: a silence of the whole fleet arms it only if some
    # heartbeat came after this moment (one arming per silence).
    last_armed_at: Mapped[datetime | None] = mapped_column(TZ)


class JobTransitionTotal(Base):
    """Monotonic totals of ``job_events``, kept by a trigger in the same transaction.

    One row per (tenant, workspace, kind, transition). Retention pruning deletes
    jobs and their events but never these rows, so the Prometheus counters and
    histograms derived from them never go backwards. ``*_buckets`` hold
    per-bucket (not cumulative) observation counts; the bucket bounds are the
    SQL functions ``ffworker_seconds_bounds()`` and ``ffworker_speed_bounds()``,
    with one extra last element for observations above the highest bound.
    """

    __tablename__ = "job_transition_totals"

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(UUID, ForeignKey("tenants.id", ondelete="CASCADE"))
    workspace: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(Text)
    from_status: Mapped[str | None] = mapped_column(Text)
    to_status: Mapped[str] = mapped_column(Text)
    by_reaper: Mapped[bool] = mapped_column(Boolean)
    transitions: Mapped[int] = mapped_column(BigInteger, server_default="0")
    seconds_count: Mapped[int] = mapped_column(BigInteger, server_default="0")
    seconds_sum: Mapped[float] = mapped_column(Double, server_default="0")
    seconds_buckets: Mapped[list[int]] = mapped_column(ARRAY(BigInteger))
    speed_count: Mapped[int] = mapped_column(BigInteger, server_default="0")
    speed_sum: Mapped[float] = mapped_column(Double, server_default="0")
    speed_buckets: Mapped[list[int]] = mapped_column(ARRAY(BigInteger))
    media_seconds: Mapped[float] = mapped_column(Double, server_default="0")
    first_at: Mapped[datetime] = mapped_column(TZ, server_default=func.now())
    last_at: Mapped[datetime] = mapped_column(TZ, server_default=func.now())

    __table_args__ = (
        Index(
            "uq_job_transition_totals_key", "tenant_id", "workspace", "kind", "from_status", "to_status", "by_reaper",
            unique=True, postgresql_nulls_not_distinct=True,
        ),
    )


# -- the dashboard: operators and sign-in sessions ---------------------------------------


class Operator(Base):
    """People who run the service: they see every tenant's jobs in the dashboard.

    The key is shown once (``manage.py operators create NAME``) and stored only as its
    SHA-256, like tenants' API keys.
    """

    __tablename__ = "operators"

    id: Mapped[uuid.UUID] = mapped_column(UUID, primary_key=True, server_default=func.gen_random_uuid())
    name: Mapped[str] = mapped_column(Text, unique=True)
    prefix: Mapped[str] = mapped_column(Text)
    key_sha256: Mapped[str] = mapped_column(Text, unique=True)
    created_at: Mapped[datetime] = mapped_column(TZ, server_default=func.now())
    revoked_at: Mapped[datetime | None] = mapped_column(TZ)


class UiSession(Base):
    """A dashboard sign-in. The browser's cookie holds a random session id; this row holds its
    SHA-256 and whom it signed in (a tenant's API key, or an operator), never a key."""

    __tablename__ = "ui_sessions"

    id_sha256: Mapped[str] = mapped_column(Text, primary_key=True)
    api_key_id: Mapped[uuid.UUID | None] = mapped_column(UUID, ForeignKey("api_keys.id", ondelete="CASCADE"))
    operator_id: Mapped[uuid.UUID | None] = mapped_column(UUID, ForeignKey("operators.id", ondelete="CASCADE"))
    csrf_token: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(TZ, server_default=func.now())
    expires_at: Mapped[datetime] = mapped_column(TZ, index=True)

    __table_args__ = (
        CheckConstraint("(api_key_id IS NULL) <> (operator_id IS NULL)", name="one_principal"),
    )


# The dashboard's listings across tenants (operators): newest first, optionally by status.
Index("ix_jobs_created", Job.__table__.c.created_at.desc(), Job.__table__.c.id.desc())
Index("ix_jobs_status_created", Job.__table__.c.status, Job.__table__.c.created_at.desc(),
      Job.__table__.c.id.desc())


# -- webhooks (migration 0008) -------------------------------------------------

WEBHOOK_EVENTS = ("job.started", "job.completed", "job.failed", "job.cancelled")
DELIVERY_STATUSES = ("pending", "delivered", "failed")


class WebhookSecret(Base):
    """A tenant's signing secrets: the current one (``expires_at`` null) and any rotated
    out less than a day ago, which keep signing until ``expires_at``."""

    __tablename__ = "webhook_secrets"

    id: Mapped[uuid.UUID] = mapped_column(UUID, primary_key=True, server_default=func.gen_random_uuid())
    tenant_id: Mapped[uuid.UUID] = mapped_column(UUID, ForeignKey("tenants.id", ondelete="CASCADE"))
    secret: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(TZ, server_default=func.now())
    expires_at: Mapped[datetime | None] = mapped_column(TZ)

    __table_args__ = (
        Index("uq_webhook_secrets_current", "tenant_id", unique=True, postgresql_where=text("expires_at IS NULL")),
    )


class WebhookEndpoint(Base):
    __tablename__ = "webhook_endpoints"

    id: Mapped[uuid.UUID] = mapped_column(UUID, primary_key=True, server_default=func.gen_random_uuid())
    tenant_id: Mapped[uuid.UUID] = mapped_column(UUID, ForeignKey("tenants.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(Text)
    events: Mapped[list[str]] = mapped_column(ARRAY(Text))
    workspace: Mapped[str | None] = mapped_column(Text)
    description: Mapped[str] = mapped_column(Text, server_default="")
    enabled: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    created_at: Mapped[datetime] = mapped_column(TZ, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(TZ, server_default=func.now())
    # The first failed attempt since the last success: 5 days of failures disable the endpoint.
    failing_since: Mapped[datetime | None] = mapped_column(TZ)
    disabled_reason: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        CheckConstraint(f"events <@ ARRAY[{', '.join(repr(e) for e in WEBHOOK_EVENTS)}]::text[] "
                        "AND cardinality(events) >= 1", name="events_valid"),
        Index("ix_webhook_endpoints_tenant_created", "tenant_id", "created_at"),
    )


class WebhookDelivery(Base):
    """The outbox: one row per (transition, target), written by the ``job_events`` trigger."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[uuid.UUID] = mapped_column(UUID, primary_key=True, server_default=func.gen_random_uuid())
    tenant_id: Mapped[uuid.UUID] = mapped_column(UUID, ForeignKey("tenants.id", ondelete="CASCADE"))
    job_id: Mapped[uuid.UUID] = mapped_column(UUID, ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    endpoint_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID, ForeignKey("webhook_endpoints.id", ondelete="CASCADE"), index=True)
    url: Mapped[str | None] = mapped_column(Text)  # the job's own webhook_url; null for an endpoint's
    event: Mapped[str] = mapped_column(Text)
    webhook_id: Mapped[str] = mapped_column(Text, unique=True)
    event_at: Mapped[datetime] = mapped_column(TZ)
    job_snapshot: Mapped[dict] = mapped_column(JSONB)
    status: Mapped[str] = mapped_column(Text, server_default="pending")
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    scheduled_attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    current_scheduled: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    next_attempt_at: Mapped[datetime | None] = mapped_column(TZ, server_default=func.now())
    retry_requested_at: Mapped[datetime | None] = mapped_column(TZ)
    lease_until: Mapped[datetime | None] = mapped_column(TZ)
    published_at: Mapped[datetime | None] = mapped_column(TZ)
    publish_count: Mapped[int] = mapped_column(Integer, server_default="0")
    created_at: Mapped[datetime] = mapped_column(TZ, server_default=func.now())
    finished_at: Mapped[datetime | None] = mapped_column(TZ)

    __table_args__ = (
        CheckConstraint(_in_list("status", DELIVERY_STATUSES), name="status_valid"),
        CheckConstraint(_in_list("event", WEBHOOK_EVENTS), name="event_valid"),
        CheckConstraint("(endpoint_id IS NULL) <> (url IS NULL)", name="one_target"),
        Index("ix_webhook_deliveries_tenant_created", "tenant_id", text("created_at DESC"), text("id DESC")),
        Index("ix_webhook_deliveries_pending_next", "next_attempt_at", postgresql_where=text("status = 'pending'")),
        Index("ix_webhook_deliveries_retry_requested", "retry_requested_at",
              postgresql_where=text("retry_requested_at IS NOT NULL")),
    )


class WebhookAttempt(Base):
    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    delivery_id: Mapped[uuid.UUID] = mapped_column(UUID, ForeignKey("webhook_deliveries.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    scheduled: Mapped[bool] = mapped_column(Boolean)
    started_at: Mapped[datetime] = mapped_column(TZ, server_default=func.now())
    finished_at: Mapped[datetime | None] = mapped_column(TZ)
    status_code: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[float | None] = mapped_column(Double)
    error_class: Mapped[str | None] = mapped_column(Text)
    response_excerpt: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (UniqueConstraint("delivery_id", "attempt"),)


class WebhookAudit(Base):
    """Endpoint and secret changes, the automatic disabling of a failing endpoint included."""

    __tablename__ = "webhook_audit"

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(UUID, ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    endpoint_id: Mapped[uuid.UUID | None] = mapped_column(UUID)
    at: Mapped[datetime] = mapped_column(TZ, server_default=func.now())
    action: Mapped[str] = mapped_column(Text)
    detail: Mapped[str | None] = mapped_column(Text)


class WebhookTotal(Base):
    """Monotonic delivery counters for the metrics (kept when deliveries are pruned).

    ``counter`` is ``attempts`` (outcome: the attempt's result class) or
    ``deliveries`` (outcome: delivered / failed, with the transition-to-receiver
    latency of delivered ones in the per-bucket ``seconds_buckets``).
    """

    __tablename__ = "webhook_totals"

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(UUID, ForeignKey("tenants.id", ondelete="CASCADE"))
    counter: Mapped[str] = mapped_column(Text)
    outcome: Mapped[str] = mapped_column(Text)
    total: Mapped[int] = mapped_column(BigInteger, server_default="0")
    seconds_sum: Mapped[float] = mapped_column(Double, server_default="0")
    seconds_buckets: Mapped[list[int]] = mapped_column(ARRAY(BigInteger))

    __table_args__ = (Index("uq_webhook_totals_key", "tenant_id", "counter", "outcome", unique=True),)


# -- probe cache (migration 0011) ------------------------------------------------


class ProbeCache(Base):
    """ffprobe's JSON for a tenant's file, valid while the file's stat is the one recorded:
    a worker reuses it instead of starting ffprobe only when size, mtime, ctime and inode
    all still match."""

    __tablename__ = "probe_cache"

    tenant_id: Mapped[uuid.UUID] = mapped_column(UUID, ForeignKey("tenants.id", ondelete="CASCADE"),
                                                 primary_key=True)
    path: Mapped[str] = mapped_column(Text, primary_key=True)  # relative to the tenant's directory
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    ctime_ns: Mapped[int] = mapped_column(BigInteger)
    inode: Mapped[int] = mapped_column(BigInteger)
    options: Mapped[str] = mapped_column(Text)  # how ffprobe ran: binary, demuxer whitelist, hashes
    probe: Mapped[dict] = mapped_column(JSONB)
    probed_at: Mapped[datetime] = mapped_column(TZ, server_default=func.now())
