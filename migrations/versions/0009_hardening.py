"""Claim ids, per-attempt stderr on the audit row, one arming per silence

Revision ID: 0009
Revises: 0006

* ``jobs.claim_id``: a random id written by every claim. A worker whose claim
  reply was lost re-reads the row and runs the job only if it shows its own id.
* ``job_events.stderr_tail``: the stderr tail of the attempt a transition ended.
  The next claim clears ``jobs.stderr_tail`` (and the progress columns); the audit
  row keeps each attempt's tail.
* ``maintenance_state.last_armed_at``: when the reaper last armed; a silent fleet
  arms it again only if a heartbeat came after that moment.
* ``ck_jobs_queued_not_cancel_requested``: a queued job with a pending cancel is
  never claimed, re-dispatched or reaped, so no write may leave one. Rows left so
  by earlier versions end ``cancelled`` here, with their audit row.
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None

END_STUCK_CANCELS = """
WITH ended AS (
    UPDATE jobs SET status = 'cancelled', finished_at = now(), updated_at = now(),
           run_after = now(), error_code = 'cancelled', error_message = 'cancelled while queued for a retry'
    WHERE status = 'queued' AND cancel_requested_at IS NOT NULL
    RETURNING id, attempts
)
INSERT INTO job_events (job_id, from_status, to_status, attempt, reason, actor)
SELECT id, 'queued', 'cancelled', attempts, 'cancelled while queued for a retry', 'worker' FROM ended
"""


def upgrade() -> None:
    op.add_column('jobs', sa.Column('claim_id', postgresql.UUID(), nullable=True))
    op.add_column('job_events', sa.Column('stderr_tail', sa.Text(), nullable=True))
    op.add_column('maintenance_state', sa.Column('last_armed_at', postgresql.TIMESTAMP(timezone=True), nullable=True))
    op.execute(END_STUCK_CANCELS)
    op.create_check_constraint(
        op.f('ck_jobs_queued_not_cancel_requested'), 'jobs',
        "NOT (status = 'queued' AND cancel_requested_at IS NOT NULL)",
    )


def downgrade() -> None:
    op.drop_constraint(op.f('ck_jobs_queued_not_cancel_requested'), 'jobs', type_='check')
    op.drop_column('maintenance_state', 'last_armed_at')
    op.drop_column('job_events', 'stderr_tail')
    op.drop_column('jobs', 'claim_id')
