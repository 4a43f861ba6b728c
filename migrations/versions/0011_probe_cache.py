"""Probe cache: ffprobe's description of a tenant's file, kept while the file is unchanged

Revision ID: 0011
Revises: 0009

* ``probe_cache``: one row per (tenant, path) holding the JSON ffprobe printed for
  the file and the ``stat`` of the file it described (size, mtime and ctime in
  nanoseconds, inode). A worker reuses the row only when the file's current stat
  equals all of them, so a rewritten, replaced or touched file is probed again, and
  only for a probe run with the same ``options`` (binary, demuxer whitelist, hashes).
  Starting ffprobe costs ≈ 100 ms; reading the row costs well under 1 ms.
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'probe_cache',
        sa.Column('tenant_id', postgresql.UUID(), nullable=False),
        sa.Column('path', sa.Text(), nullable=False),
        sa.Column('size_bytes', sa.BigInteger(), nullable=False),
        sa.Column('mtime_ns', sa.BigInteger(), nullable=False),
        sa.Column('ctime_ns', sa.BigInteger(), nullable=False),
        sa.Column('inode', sa.BigInteger(), nullable=False),
        sa.Column('options', sa.Text(), nullable=False),
        sa.Column('probe', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column('probed_at', postgresql.TIMESTAMP(timezone=True), server_default=sa.text('now()'),
                  nullable=False),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('tenant_id', 'path'),
    )


def downgrade() -> None:
    op.drop_table('probe_cache')
