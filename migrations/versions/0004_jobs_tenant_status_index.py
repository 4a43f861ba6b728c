"""jobs: index for a tenant's job list filtered by status (and kind)

Revision ID: 0004
Revises: 0003

GET /v1/jobs?status=…&kind=… used to walk the tenant's whole history newest
first (ix_jobs_tenant_created), or every running/queued job of every tenant
through the maintenance indexes, filtering row by row: a page of a rare
combination (failed raw commands, say) read most of the tenant's rows. This
index leads with (tenant_id, status) in list order, so a status filter reads one
page, and carries kind as a trailing key column, so a kind filter is checked in
the index without visiting the rows it rejects. None of its columns is written by
progress or heartbeat updates: those stay HOT.

Built in the upgrade's transaction, like every schema change here (upgraders are
serialised by env.py's lock): writes to jobs wait for the build, a few seconds per
million rows.
"""
from alembic import op
import sqlalchemy as sa

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        'ix_jobs_tenant_status_created', 'jobs',
        ['tenant_id', 'status', sa.literal_column('created_at DESC'), sa.literal_column('id DESC'), 'kind'],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index('ix_jobs_tenant_status_created', table_name='jobs')
