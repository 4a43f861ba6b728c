"""The migrations at head must create exactly what the models describe."""
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from ffworker.models import Base


def test_migrations_at_head_equal_the_models(engine):
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, Base.metadata)
    assert diff == []


def test_jobs_table_leaves_room_for_hot_updates(engine):
    with engine.connect() as conn:
        options = conn.exec_driver_sql("SELECT reloptions FROM pg_class WHERE relname = 'jobs'").scalar()
    assert "fillfactor=80" in options
