"""dashboard: operators, sign-in sessions, and indexes of the listings across tenants

Revision ID: 0007
Revises: 0006

``operators`` hold the hashed keys of the people who run the service (they see
every tenant in the dashboard). ``ui_sessions`` map the SHA-256 of a dashboard
session cookie to the tenant API key or the operator that signed in, with the
session's CSRF token; the cookie itself holds only a random id.

An operator's job list has no tenant to lead the index with: ``ix_jobs_created``
serves it newest first, ``ix_jobs_status_created`` with a status filter. Neither
holds a column that progress or heartbeat writes touch, so those stay HOT.
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('operators',
    sa.Column('id', sa.UUID(), server_default=sa.text('gen_random_uuid()'), nullable=False),
    sa.Column('name', sa.Text(), nullable=False),
    sa.Column('prefix', sa.Text(), nullable=False),
    sa.Column('key_sha256', sa.Text(), nullable=False),
    sa.Column('created_at', postgresql.TIMESTAMP(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('revoked_at', postgresql.TIMESTAMP(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_operators')),
    sa.UniqueConstraint('name', name=op.f('uq_operators_name')),
    sa.UniqueConstraint('key_sha256', name=op.f('uq_operators_key_sha256'))
    )
    op.create_table('ui_sessions',
    sa.Column('id_sha256', sa.Text(), nullable=False),
    sa.Column('api_key_id', sa.UUID(), nullable=True),
    sa.Column('operator_id', sa.UUID(), nullable=True),
    sa.Column('csrf_token', sa.Text(), nullable=False),
    sa.Column('created_at', postgresql.TIMESTAMP(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('expires_at', postgresql.TIMESTAMP(timezone=True), nullable=False),
    sa.CheckConstraint('(api_key_id IS NULL) <> (operator_id IS NULL)', name=op.f('ck_ui_sessions_one_principal')),
    sa.ForeignKeyConstraint(['api_key_id'], ['api_keys.id'], name=op.f('fk_ui_sessions_api_key_id_api_keys'),
                            ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['operator_id'], ['operators.id'], name=op.f('fk_ui_sessions_operator_id_operators'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id_sha256', name=op.f('pk_ui_sessions'))
    )
    op.create_index(op.f('ix_ui_sessions_expires_at'), 'ui_sessions', ['expires_at'], unique=False)
    op.create_index('ix_jobs_created', 'jobs', [sa.literal_column('created_at DESC'), sa.literal_column('id DESC')],
                    unique=False)
    op.create_index('ix_jobs_status_created', 'jobs',
                    ['status', sa.literal_column('created_at DESC'), sa.literal_column('id DESC')], unique=False)


def downgrade() -> None:
    op.drop_index('ix_jobs_status_created', table_name='jobs')
    op.drop_index('ix_jobs_created', table_name='jobs')
    op.drop_index(op.f('ix_ui_sessions_expires_at'), table_name='ui_sessions')
    op.drop_table('ui_sessions')
    op.drop_table('operators')
