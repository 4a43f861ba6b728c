"""monotonic transition totals (Prometheus metrics) and reporting views

Revision ID: 0002
Revises: 0001

``job_transition_totals`` is maintained by a trigger on ``job_events`` in the
same transaction as the transition itself, so its numbers only ever grow, even
after retention pruning deleted the jobs and events they were counted from.
The ``report_*`` views are for analysts (see docs/ledger.md).
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

# Histogram bucket upper bounds. Changing them needs a migration that rewrites
# the *_buckets arrays: stored counts are positional.
SECONDS_BOUNDS = "0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600"
SPEED_BOUNDS = "0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128"

FUNCTIONS = f"""
CREATE FUNCTION ffworker_seconds_bounds() RETURNS double precision[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT ARRAY[{SECONDS_BOUNDS}]::double precision[] $$;

CREATE FUNCTION ffworker_speed_bounds() RETURNS double precision[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT ARRAY[{SPEED_BOUNDS}]::double precision[] $$;

-- Counts per bucket (not cumulative) for one observation: a 1 in the first bucket
-- whose upper bound is >= value (Prometheus "le"), or in the extra last one; all
-- zeros for NULL.
CREATE FUNCTION ffworker_observation(x double precision, bounds double precision[]) RETURNS bigint[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT array_agg(CASE WHEN x IS NOT NULL
                           AND i = 1 + (SELECT count(*) FROM unnest(bounds) AS b WHERE b < x)
                          THEN 1 ELSE 0 END::bigint ORDER BY i)
    FROM generate_series(1, cardinality(bounds) + 1) AS i
$$;

CREATE FUNCTION ffworker_add_counts(a bigint[], b bigint[]) RETURNS bigint[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT array_agg(coalesce(x, 0) + coalesce(y, 0) ORDER BY i)
    FROM unnest(a, b) WITH ORDINALITY AS u(x, y, i)
$$;

-- Fold one job_events row into job_transition_totals. Observations:
--   queued → running: queue wait, from the moment the job was due (run_after:
--     submission, or the end of a retry's backoff) to the claim;
--   running → anything: run time of that attempt (claim to this transition);
--   running → completed: ffmpeg's final speed (× real time) and the input's
--     duration (media seconds processed).
CREATE FUNCTION ffworker_count_transition(e job_events) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    j record;
    seconds double precision;
    speed double precision;
    media double precision;
BEGIN
    SELECT tenant_id, workspace, kind, run_after, started_at, progress_speed, media_duration_s
      INTO j FROM jobs WHERE id = e.job_id;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF e.from_status = 'queued' AND e.to_status = 'running' THEN
        seconds := greatest(0, extract(epoch FROM e.at - j.run_after));
    ELSIF e.from_status = 'running' AND j.started_at IS NOT NULL THEN
        seconds := greatest(0, extract(epoch FROM e.at - j.started_at));
        IF e.to_status = 'completed' THEN
            speed := j.progress_speed;
            media := j.media_duration_s;
        END IF;
    END IF;
    INSERT INTO job_transition_totals AS t (
        tenant_id, workspace, kind, from_status, to_status, by_reaper, transitions,
        seconds_count, seconds_sum, seconds_buckets, speed_count, speed_sum, speed_buckets,
        media_seconds, first_at, last_at
    ) VALUES (
        j.tenant_id, j.workspace, j.kind, e.from_status, e.to_status,
        coalesce(e.reason LIKE 'stale:%', false), 1,
        (seconds IS NOT NULL)::int, coalesce(seconds, 0), ffworker_observation(seconds, ffworker_seconds_bounds()),
        (speed IS NOT NULL)::int, coalesce(speed, 0), ffworker_observation(speed, ffworker_speed_bounds()),
        coalesce(media, 0), e.at, e.at
    )
    ON CONFLICT (tenant_id, workspace, kind, from_status, to_status, by_reaper) DO UPDATE SET
        transitions = t.transitions + 1,
        seconds_count = t.seconds_count + excluded.seconds_count,
        seconds_sum = t.seconds_sum + excluded.seconds_sum,
        seconds_buckets = ffworker_add_counts(t.seconds_buckets, excluded.seconds_buckets),
        speed_count = t.speed_count + excluded.speed_count,
        speed_sum = t.speed_sum + excluded.speed_sum,
        speed_buckets = ffworker_add_counts(t.speed_buckets, excluded.speed_buckets),
        media_seconds = t.media_seconds + excluded.media_seconds,
        last_at = greatest(t.last_at, excluded.last_at);
END;
$$;

CREATE FUNCTION ffworker_job_events_count() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM ffworker_count_transition(NEW);
    RETURN NULL;
END;
$$;
"""

VIEWS = """
-- Daily job counts by tenant, kind and status. The day (UTC) is the day the job
-- was submitted.
CREATE VIEW report_daily_jobs AS
SELECT
    (j.created_at AT TIME ZONE 'UTC')::date AS day,
    t.name AS tenant,
    j.kind,
    j.status,
    count(*) AS jobs,
    count(*) FILTER (WHERE j.attempts > 1) AS retried_jobs,
    percentile_cont(0.5) WITHIN GROUP (ORDER BY w.queue_wait_s) AS queue_wait_p50_s,
    percentile_cont(0.95) WITHIN GROUP (ORDER BY w.queue_wait_s) AS queue_wait_p95_s,
    percentile_cont(0.5) WITHIN GROUP (ORDER BY w.run_time_s) AS run_time_p50_s,
    percentile_cont(0.95) WITHIN GROUP (ORDER BY w.run_time_s) AS run_time_p95_s,
    coalesce(sum(j.media_duration_s) FILTER (WHERE j.status = 'completed'), 0) AS media_seconds_processed
FROM jobs j
JOIN tenants t ON t.id = j.tenant_id
CROSS JOIN LATERAL (
    SELECT
        -- submission to the first claim
        (SELECT extract(epoch FROM min(e.at) - j.created_at)::double precision
           FROM job_events e WHERE e.job_id = j.id AND e.to_status = 'running') AS queue_wait_s,
        -- the final run: its claim to the transition that ended the job
        (SELECT CASE WHEN last.from_status = 'running' AND j.status IN ('completed', 'failed', 'cancelled')
                     THEN extract(epoch FROM last.at - j.started_at)::double precision END
           FROM job_events last WHERE last.job_id = j.id ORDER BY last.id DESC LIMIT 1) AS run_time_s
) w
GROUP BY 1, 2, 3, 4;

-- Per tenant and month (UTC, by submission): what was asked for and what it cost.
CREATE VIEW report_monthly_usage AS
SELECT
    date_trunc('month', j.created_at AT TIME ZONE 'UTC')::date AS month,
    t.name AS tenant,
    count(*) AS jobs_submitted,
    count(*) FILTER (WHERE j.status = 'completed') AS jobs_completed,
    count(*) FILTER (WHERE j.status = 'failed') AS jobs_failed,
    count(*) FILTER (WHERE j.status = 'cancelled') AS jobs_cancelled,
    count(*) FILTER (WHERE j.status IN ('queued', 'running')) AS jobs_unfinished,
    coalesce(sum(j.attempts), 0)::bigint AS runs,
    coalesce(sum(j.media_duration_s) FILTER (WHERE j.status = 'completed'), 0) AS media_seconds_processed,
    coalesce(sum(u.worker_seconds), 0) AS worker_seconds,
    coalesce(sum(u.output_bytes) FILTER (WHERE j.status = 'completed'), 0)::bigint AS output_bytes
FROM jobs j
JOIN tenants t ON t.id = j.tenant_id
CROSS JOIN LATERAL (
    SELECT
        -- every finished run, retried ones included: claim to the run's end
        (SELECT sum(extract(epoch FROM r.at - r.claimed_at))::double precision FROM (
            SELECT e.at, e.from_status, lag(e.at) OVER (ORDER BY e.id) AS claimed_at
              FROM job_events e WHERE e.job_id = j.id) r
          WHERE r.from_status = 'running') AS worker_seconds,
        (SELECT sum((o ->> 'size_bytes')::bigint)
           FROM jsonb_array_elements(CASE WHEN jsonb_typeof(j.result -> 'outputs') = 'array'
                                          THEN j.result -> 'outputs' ELSE '[]'::jsonb END) o) AS output_bytes
) u
GROUP BY 1, 2;

-- Running jobs without a heartbeat for longer than the stale threshold: what the
-- reaper will act on. The threshold is the session setting ffworker.stale_after_s
-- (manage.py report sets it from FFWORKER_STALE_AFTER_S), else 60 s.
CREATE VIEW report_stuck_jobs AS
SELECT
    j.id AS job_id,
    t.name AS tenant,
    j.workspace,
    j.kind,
    j.attempts AS attempt,
    j.max_attempts,
    j.worker,
    j.started_at,
    j.heartbeat_at AS last_heartbeat_at,
    extract(epoch FROM now() - j.heartbeat_at)::double precision AS silent_for_s,
    extract(epoch FROM now() - j.started_at)::double precision AS running_for_s,
    j.progress_percent,
    j.cancel_requested_at IS NOT NULL AS cancel_requested,
    s.stale_after_s,
    CASE WHEN j.cancel_requested_at IS NOT NULL THEN 'cancelled'
         WHEN j.attempts < j.max_attempts THEN 'queued'
         ELSE 'failed' END AS reaper_outcome
FROM jobs j
JOIN tenants t ON t.id = j.tenant_id
CROSS JOIN (
    SELECT coalesce(nullif(current_setting('ffworker.stale_after_s', true), '')::double precision, 60)
           AS stale_after_s
) s
WHERE j.status = 'running'
  AND j.heartbeat_at < now() - make_interval(secs => s.stale_after_s);
"""


def upgrade() -> None:
    op.create_table('job_transition_totals',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=True), nullable=False),
    sa.Column('tenant_id', sa.UUID(), nullable=False),
    sa.Column('workspace', sa.Text(), nullable=False),
    sa.Column('kind', sa.Text(), nullable=False),
    sa.Column('from_status', sa.Text(), nullable=True),
    sa.Column('to_status', sa.Text(), nullable=False),
    sa.Column('by_reaper', sa.Boolean(), nullable=False),
    sa.Column('transitions', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('seconds_count', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('seconds_sum', sa.Double(), server_default='0', nullable=False),
    sa.Column('seconds_buckets', postgresql.ARRAY(sa.BigInteger()), nullable=False),
    sa.Column('speed_count', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('speed_sum', sa.Double(), server_default='0', nullable=False),
    sa.Column('speed_buckets', postgresql.ARRAY(sa.BigInteger()), nullable=False),
    sa.Column('media_seconds', sa.Double(), server_default='0', nullable=False),
    sa.Column('first_at', postgresql.TIMESTAMP(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('last_at', postgresql.TIMESTAMP(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_job_transition_totals_tenant_id_tenants'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_job_transition_totals'))
    )
    op.create_index('uq_job_transition_totals_key', 'job_transition_totals',
                    ['tenant_id', 'workspace', 'kind', 'from_status', 'to_status', 'by_reaper'],
                    unique=True, postgresql_nulls_not_distinct=True)
    # Rewritten by every transition: room for heap-only (HOT) updates.
    op.execute("ALTER TABLE job_transition_totals SET (fillfactor = 50)")
    op.execute(FUNCTIONS)
    # Count what the ledger already holds, oldest first. For jobs retried before
    # this migration, queue waits and run times of earlier attempts are measured
    # against the job's latest run_after / started_at (the only ones kept).
    op.execute("""
        DO $$
        DECLARE e job_events;
        BEGIN
            FOR e IN SELECT * FROM job_events ORDER BY id LOOP
                PERFORM ffworker_count_transition(e);
            END LOOP;
        END
        $$
    """)
    op.execute(
        "CREATE TRIGGER job_events_count AFTER INSERT ON job_events "
        "FOR EACH ROW EXECUTE FUNCTION ffworker_job_events_count()"
    )
    op.execute(VIEWS)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS report_stuck_jobs, report_monthly_usage, report_daily_jobs")
    op.execute("DROP TRIGGER IF EXISTS job_events_count ON job_events")
    op.execute("DROP FUNCTION IF EXISTS ffworker_job_events_count()")
    op.execute("DROP FUNCTION IF EXISTS ffworker_count_transition(job_events)")
    op.execute("DROP FUNCTION IF EXISTS ffworker_add_counts(bigint[], bigint[])")
    op.execute("DROP FUNCTION IF EXISTS ffworker_observation(double precision, double precision[])")
    op.execute("DROP FUNCTION IF EXISTS ffworker_speed_bounds()")
    op.execute("DROP FUNCTION IF EXISTS ffworker_seconds_bounds()")
    op.drop_index('uq_job_transition_totals_key', table_name='job_transition_totals')
    op.drop_table('job_transition_totals')
