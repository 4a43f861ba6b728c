"""job_events.actor, and one definition of "stale"

Revision ID: 0006
Revises: 0005

``job_events.actor`` says who made a transition: ``api`` (submission, cancel of a
queued job), ``worker`` (claim and the run's own ending) or ``reaper``. Until now
the metrics trigger recognised the reaper's transitions by their reason text
(``stale: …``); it now reads the marker, and existing rows are backfilled from
that same text, so ``job_transition_totals.by_reaper`` means what it meant.

``ffworker_is_stale(heartbeat_at, stale_after_s)`` is the one definition of a
silent run: the reaper, ``GET /metrics`` and ``report_stuck_jobs`` all call it.
Being a one-expression SQL function, PostgreSQL inlines it into each query.
"""
from alembic import op
import sqlalchemy as sa

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

IS_STALE = """
CREATE FUNCTION ffworker_is_stale(heartbeat_at timestamptz, stale_after_s double precision) RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE AS $$ SELECT heartbeat_at < now() - make_interval(secs => stale_after_s) $$
"""

BACKFILL = """
UPDATE job_events SET actor = CASE
    WHEN reason LIKE 'stale:%' THEN 'reaper'
    WHEN from_status IS NULL OR (from_status = 'queued' AND to_status = 'cancelled') THEN 'api'
    ELSE 'worker' END
"""

# 0002's view with its threshold test replaced by the function; columns unchanged.
STUCK_VIEW = """
CREATE OR REPLACE VIEW report_stuck_jobs AS
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
  AND {stale}
"""


def count_transition(by_reaper: str) -> str:
    """0002's trigger body, with the reaper recognised by ``by_reaper``."""
    return f"""
CREATE OR REPLACE FUNCTION ffworker_count_transition(e job_events) RETURNS void
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
        {by_reaper}, 1,
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
"""


def upgrade() -> None:
    op.add_column('job_events', sa.Column('actor', sa.Text(), nullable=True))
    op.execute(BACKFILL)
    op.alter_column('job_events', 'actor', nullable=False)
    op.create_check_constraint(op.f('ck_job_events_actor_valid'), 'job_events', "actor IN ('api', 'worker', 'reaper')")
    op.execute(count_transition("e.actor = 'reaper'"))
    op.execute(IS_STALE)
    op.execute(STUCK_VIEW.format(stale="ffworker_is_stale(j.heartbeat_at, s.stale_after_s)"))


def downgrade() -> None:
    op.execute(STUCK_VIEW.format(stale="j.heartbeat_at < now() - make_interval(secs => s.stale_after_s)"))
    op.execute("DROP FUNCTION ffworker_is_stale(timestamptz, double precision)")
    op.execute(count_transition("coalesce(e.reason LIKE 'stale:%', false)"))
    op.drop_constraint(op.f('ck_job_events_actor_valid'), 'job_events', type_='check')
    op.drop_column('job_events', 'actor')
