"""jobs.outputs_placed_attempt: which attempt began placing the job's outputs

Revision ID: 0003
Revises: 0002

A worker that dies after moving its outputs into place but before recording
completion leaves files that belong to the job. The next attempt reads this
column to know it may replace them instead of failing with ``output_exists``.
A nullable column without a default: adding it rewrites nothing.
"""
from alembic import op
import sqlalchemy as sa

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('jobs', sa.Column('outputs_placed_attempt', sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_column('jobs', 'outputs_placed_attempt')
