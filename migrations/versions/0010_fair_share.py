"""Fair share: job slots, tenant limits, usage counters, the claim's index, queue wait per tenant

Revision ID: 0010
Revises: 0009

* ``jobs.slots``: what a running job costs its tenant (set at submission from its kind).
* ``tenants.max_slots`` / ``tenants.rate_per_min``: a tenant's own limits (NULL: the
  default ``FFWORKER_TENANT_MAX_SLOTS``; no rate limit).
* ``tenant_usage`` (one row per tenant) and ``fleet_usage`` (one row): running jobs and
  slots, and a tenant's recent starts, kept by a trigger on ``jobs`` in the transaction of
  the transition itself. The claim locks these rows: the locked rows are the latest
  versions even in a statement whose snapshot is older, which is what makes the limits
  hold across any number of racing claims (docs/ledger.md, "Fair share").
  Lock order is fixed: ``fleet_usage`` first, then tenant rows, so claims and transitions
  never deadlock.
* ``ix_jobs_queued_tenant_next``: a tenant's next job (priority, then oldest due) read
  from the index, whatever the backlog.
* ``report_queue_wait``: per day and tenant, how long claims waited.
"""
from alembic import op
import sqlalchemy as sa

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None

USAGE = """
CREATE TABLE fleet_usage (
    id integer PRIMARY KEY DEFAULT 1 CONSTRAINT ck_fleet_usage_one_row CHECK (id = 1),
    running_jobs integer NOT NULL DEFAULT 0
);
INSERT INTO fleet_usage (id, running_jobs)
SELECT 1, count(*) FROM jobs WHERE status = 'running';

CREATE TABLE tenant_usage (
    tenant_id uuid PRIMARY KEY
        CONSTRAINT fk_tenant_usage_tenant_id_tenants REFERENCES tenants (id) ON DELETE CASCADE,
    running_jobs integer NOT NULL DEFAULT 0,
    running_slots integer NOT NULL DEFAULT 0,
    -- the claim's tie-break between tenants using the same fraction: least recently served first
    last_started_at timestamptz,
    -- starts within the last 60 s, newest last; kept only for tenants with a rate limit
    recent_starts timestamptz[] NOT NULL DEFAULT '{}'
);
INSERT INTO tenant_usage (tenant_id, running_jobs, running_slots)
SELECT t.id, count(j.id), coalesce(sum(j.slots), 0)
FROM tenants t LEFT JOIN jobs j ON j.tenant_id = t.id AND j.status = 'running'
GROUP BY t.id;

CREATE FUNCTION ffworker_tenant_usage_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO tenant_usage (tenant_id) VALUES (NEW.id);
    RETURN NULL;
END;
$$;
CREATE TRIGGER tenants_usage_row AFTER INSERT ON tenants
    FOR EACH ROW EXECUTE FUNCTION ffworker_tenant_usage_row();

-- A job entering or leaving `running` moves the counters, in the transition's own
-- transaction. The fleet row is updated first: the claim locks it first too.
CREATE FUNCTION ffworker_track_usage() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    rate integer;
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.status = 'running' THEN
        UPDATE fleet_usage SET running_jobs = running_jobs + 1 WHERE id = 1;
        SELECT rate_per_min INTO rate FROM tenants WHERE id = NEW.tenant_id;
        UPDATE tenant_usage
           SET running_jobs = running_jobs + 1,
               running_slots = running_slots + NEW.slots,
               last_started_at = now(),
               recent_starts = CASE WHEN rate IS NULL THEN '{}'::timestamptz[] ELSE
                   array(SELECT s FROM (
                       SELECT s FROM unnest(recent_starts || now()) s
                        WHERE s > now() - interval '60 seconds' ORDER BY s DESC LIMIT rate) kept
                         ORDER BY s) END
         WHERE tenant_id = NEW.tenant_id;
    ELSE
        UPDATE fleet_usage SET running_jobs = running_jobs - 1 WHERE id = 1;
        UPDATE tenant_usage
           SET running_jobs = running_jobs - 1, running_slots = running_slots - OLD.slots
         WHERE tenant_id = OLD.tenant_id;
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER jobs_usage_update AFTER UPDATE OF status ON jobs
    FOR EACH ROW WHEN ((OLD.status = 'running') IS DISTINCT FROM (NEW.status = 'running'))
    EXECUTE FUNCTION ffworker_track_usage();
CREATE TRIGGER jobs_usage_delete AFTER DELETE ON jobs
    FOR EACH ROW WHEN (OLD.status = 'running')
    EXECUTE FUNCTION ffworker_track_usage();
"""

QUEUE_WAIT_VIEW = """
-- Per day (UTC, of the claim) and tenant: how long each claim waited, from the moment
-- its job was last queued (submitted, retried, re-queued) or, when later, became due.
CREATE VIEW report_queue_wait AS
SELECT
    (c.at AT TIME ZONE 'UTC')::date AS day,
    t.name AS tenant,
    count(*) AS claims,
    percentile_cont(0.5) WITHIN GROUP (ORDER BY w.wait_s) AS queue_wait_p50_s,
    percentile_cont(0.95) WITHIN GROUP (ORDER BY w.wait_s) AS queue_wait_p95_s,
    max(w.wait_s) AS queue_wait_max_s
FROM job_events c
JOIN jobs j ON j.id = c.job_id
JOIN tenants t ON t.id = j.tenant_id
CROSS JOIN LATERAL (
    SELECT greatest(0, extract(epoch FROM c.at - q.at))::double precision AS wait_s
      FROM job_events q
     WHERE q.job_id = c.job_id AND q.id < c.id AND q.to_status = 'queued'
     ORDER BY q.id DESC LIMIT 1
) w
WHERE c.to_status = 'running'
GROUP BY 1, 2;
"""


def upgrade() -> None:
    op.add_column('jobs', sa.Column('slots', sa.Integer(), server_default='1', nullable=False))
    op.create_check_constraint(op.f('ck_jobs_slots_valid'), 'jobs', 'slots >= 1')
    op.add_column('tenants', sa.Column('max_slots', sa.Integer(), nullable=True))
    op.add_column('tenants', sa.Column('rate_per_min', sa.Integer(), nullable=True))
    op.create_check_constraint(op.f('ck_tenants_limits_valid'), 'tenants',
                               '(max_slots IS NULL OR max_slots >= 1) AND (rate_per_min IS NULL OR rate_per_min >= 1)')
    op.execute(USAGE)
    op.create_index('ix_jobs_queued_tenant_next', 'jobs',
                    ['tenant_id', sa.text('priority DESC'), 'run_after', 'id'],
                    postgresql_where=sa.text("status = 'queued'"))
    op.execute(QUEUE_WAIT_VIEW)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS report_queue_wait")
    op.drop_index('ix_jobs_queued_tenant_next', table_name='jobs')
    op.execute("DROP TRIGGER IF EXISTS jobs_usage_delete ON jobs")
    op.execute("DROP TRIGGER IF EXISTS jobs_usage_update ON jobs")
    op.execute("DROP TRIGGER IF EXISTS tenants_usage_row ON tenants")
    op.execute("DROP FUNCTION IF EXISTS ffworker_track_usage(), ffworker_tenant_usage_row()")
    op.execute("DROP TABLE IF EXISTS tenant_usage, fleet_usage")
    op.drop_constraint(op.f('ck_tenants_limits_valid'), 'tenants', type_='check')
    op.drop_column('tenants', 'rate_per_min')
    op.drop_column('tenants', 'max_slots')
    op.drop_constraint(op.f('ck_jobs_slots_valid'), 'jobs', type_='check')
    op.drop_column('jobs', 'slots')
