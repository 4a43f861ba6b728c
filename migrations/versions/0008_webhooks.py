"""webhooks: endpoints, signing secrets, the delivery outbox and its attempts

Revision ID: 0008
Revises: 0006

The outbox is written by a trigger on ``job_events``: a delivery row for each
enabled endpoint of the job's tenant subscribed to the event (and for the job's
own ``webhook_url`` on a terminal event) is inserted by the very statement that
records the transition, so in its transaction. A transition that rolls back
leaves no delivery; one that commits leaves them all. The trigger snapshots the
job row as the transition left it (an AFTER trigger runs once the whole
statement is done, so it also sees a transition written as one CTE statement),
and wakes the delivery relays with ``NOTIFY ffworker_webhooks``.
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

TZ = postgresql.TIMESTAMP(timezone=True)
EVENTS = "'job.started', 'job.completed', 'job.failed', 'job.cancelled'"

OUTBOX = """
CREATE FUNCTION ffworker_webhook_outbox() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    j jobs;
    event text;
    snapshot jsonb;
    added bigint := 0;
BEGIN
    SELECT * INTO j FROM jobs WHERE id = NEW.job_id;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    event := 'job.' || CASE NEW.to_status WHEN 'running' THEN 'started' ELSE NEW.to_status END;
    -- The job as the transition left it; never the worker's host or ffmpeg's stderr.
    snapshot := to_jsonb(j) - 'stderr_tail' - 'worker' - 'request_sha256';

    INSERT INTO webhook_deliveries (tenant_id, job_id, endpoint_id, url, event, webhook_id, event_at, job_snapshot)
    SELECT j.tenant_id, j.id, e.id, NULL, event, 'msg_' || replace(gen_random_uuid()::text, '-', ''),
           NEW.at, snapshot
      FROM webhook_endpoints e
     WHERE e.tenant_id = j.tenant_id AND e.enabled AND event = ANY (e.events)
       AND (e.workspace IS NULL OR e.workspace = j.workspace);
    GET DIAGNOSTICS added = ROW_COUNT;

    IF j.webhook_url IS NOT NULL AND NEW.to_status IN ('completed', 'failed', 'cancelled') THEN
        INSERT INTO webhook_deliveries (tenant_id, job_id, endpoint_id, url, event, webhook_id, event_at,
                                        job_snapshot)
        VALUES (j.tenant_id, j.id, NULL, j.webhook_url, event, 'msg_' || replace(gen_random_uuid()::text, '-', ''),
                NEW.at, snapshot);
        added := added + 1;
    END IF;

    IF added > 0 THEN
        PERFORM pg_notify('ffworker_webhooks', '');
    END IF;
    RETURN NULL;
END;
$$;
"""


def upgrade() -> None:
    op.add_column("jobs", sa.Column("webhook_url", sa.Text(), nullable=True))

    op.create_table(
        "webhook_secrets",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("tenant_id", sa.UUID(), nullable=False),
        sa.Column("secret", sa.Text(), nullable=False),
        sa.Column("created_at", TZ, server_default=sa.text("now()"), nullable=False),
        sa.Column("expires_at", TZ, nullable=True),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name="fk_webhook_secrets_tenant_id_tenants",
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_webhook_secrets"),
    )
    op.create_index("uq_webhook_secrets_current", "webhook_secrets", ["tenant_id"], unique=True,
                    postgresql_where=sa.text("expires_at IS NULL"))

    op.create_table(
        "webhook_endpoints",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("tenant_id", sa.UUID(), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("events", postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column("workspace", sa.Text(), nullable=True),
        sa.Column("description", sa.Text(), server_default="", nullable=False),
        sa.Column("enabled", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("created_at", TZ, server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", TZ, server_default=sa.text("now()"), nullable=False),
        sa.Column("failing_since", TZ, nullable=True),
        sa.Column("disabled_reason", sa.Text(), nullable=True),
        sa.CheckConstraint(f"events <@ ARRAY[{EVENTS}]::text[] AND cardinality(events) >= 1",
                           name="ck_webhook_endpoints_events_valid"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name="fk_webhook_endpoints_tenant_id_tenants",
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_webhook_endpoints"),
    )
    op.create_index("ix_webhook_endpoints_tenant_created", "webhook_endpoints", ["tenant_id", "created_at"])

    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("tenant_id", sa.UUID(), nullable=False),
        sa.Column("job_id", sa.UUID(), nullable=False),
        sa.Column("endpoint_id", sa.UUID(), nullable=True),
        sa.Column("url", sa.Text(), nullable=True),
        sa.Column("event", sa.Text(), nullable=False),
        sa.Column("webhook_id", sa.Text(), nullable=False),
        sa.Column("event_at", TZ, nullable=False),
        sa.Column("job_snapshot", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("status", sa.Text(), server_default="pending", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("scheduled_attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("current_scheduled", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("next_attempt_at", TZ, server_default=sa.text("now()"), nullable=True),
        sa.Column("retry_requested_at", TZ, nullable=True),
        sa.Column("lease_until", TZ, nullable=True),
        sa.Column("published_at", TZ, nullable=True),
        sa.Column("publish_count", sa.Integer(), server_default="0", nullable=False),
        sa.Column("created_at", TZ, server_default=sa.text("now()"), nullable=False),
        sa.Column("finished_at", TZ, nullable=True),
        sa.CheckConstraint("status IN ('pending', 'delivered', 'failed')", name="ck_webhook_deliveries_status_valid"),
        sa.CheckConstraint(f"event IN ({EVENTS})", name="ck_webhook_deliveries_event_valid"),
        sa.CheckConstraint("(endpoint_id IS NULL) <> (url IS NULL)", name="ck_webhook_deliveries_one_target"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name="fk_webhook_deliveries_tenant_id_tenants",
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_webhook_deliveries_job_id_jobs",
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["endpoint_id"], ["webhook_endpoints.id"],
                                name="fk_webhook_deliveries_endpoint_id_webhook_endpoints", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_webhook_deliveries"),
        sa.UniqueConstraint("webhook_id", name="uq_webhook_deliveries_webhook_id"),
    )
    op.create_index("ix_webhook_deliveries_tenant_created", "webhook_deliveries",
                    ["tenant_id", sa.text("created_at DESC"), sa.text("id DESC")])
    op.create_index("ix_webhook_deliveries_job_id", "webhook_deliveries", ["job_id"])
    op.create_index("ix_webhook_deliveries_endpoint_id", "webhook_deliveries", ["endpoint_id"])
    op.create_index("ix_webhook_deliveries_pending_next", "webhook_deliveries", ["next_attempt_at"],
                    postgresql_where=sa.text("status = 'pending'"))
    op.create_index("ix_webhook_deliveries_retry_requested", "webhook_deliveries", ["retry_requested_at"],
                    postgresql_where=sa.text("retry_requested_at IS NOT NULL"))

    op.create_table(
        "webhook_attempts",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("delivery_id", sa.UUID(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("scheduled", sa.Boolean(), nullable=False),
        sa.Column("started_at", TZ, server_default=sa.text("now()"), nullable=False),
        sa.Column("finished_at", TZ, nullable=True),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("latency_ms", sa.Double(), nullable=True),
        sa.Column("error_class", sa.Text(), nullable=True),
        sa.Column("response_excerpt", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["delivery_id"], ["webhook_deliveries.id"],
                                name="fk_webhook_attempts_delivery_id_webhook_deliveries", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_webhook_attempts"),
        sa.UniqueConstraint("delivery_id", "attempt", name="uq_webhook_attempts_delivery_id_attempt"),
    )

    op.create_table(
        "webhook_audit",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("tenant_id", sa.UUID(), nullable=False),
        sa.Column("endpoint_id", sa.UUID(), nullable=True),
        sa.Column("at", TZ, server_default=sa.text("now()"), nullable=False),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name="fk_webhook_audit_tenant_id_tenants",
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_webhook_audit"),
    )
    op.create_index("ix_webhook_audit_tenant_id", "webhook_audit", ["tenant_id"])

    op.create_table(
        "webhook_totals",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("tenant_id", sa.UUID(), nullable=False),
        sa.Column("counter", sa.Text(), nullable=False),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.Column("total", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("seconds_sum", sa.Double(), server_default="0", nullable=False),
        sa.Column("seconds_buckets", postgresql.ARRAY(sa.BigInteger()), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name="fk_webhook_totals_tenant_id_tenants",
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_webhook_totals"),
    )
    op.create_index("uq_webhook_totals_key", "webhook_totals", ["tenant_id", "counter", "outcome"], unique=True)

    op.execute(OUTBOX)
    op.execute(
        "CREATE TRIGGER job_events_webhook_outbox AFTER INSERT ON job_events FOR EACH ROW "
        "WHEN (NEW.to_status IN ('running', 'completed', 'failed', 'cancelled')) "
        "EXECUTE FUNCTION ffworker_webhook_outbox()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS job_events_webhook_outbox ON job_events")
    op.execute("DROP FUNCTION IF EXISTS ffworker_webhook_outbox()")
    for table in ("webhook_totals", "webhook_audit", "webhook_attempts", "webhook_deliveries", "webhook_endpoints",
                  "webhook_secrets"):
        op.drop_table(table)
    op.drop_column("jobs", "webhook_url")
