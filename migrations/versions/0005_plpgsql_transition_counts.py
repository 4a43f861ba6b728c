"""transition totals: histogram helpers in PL/pgSQL

Revision ID: 0005
Revises: 0004

``ffworker_observation`` and ``ffworker_add_counts`` run inside the
``job_events`` trigger, so on every transition, a job's submission included.
As SQL functions built on set-returning functions and aggregates, PostgreSQL
could not inline them and planned their bodies again on every call: about
0.5 ms of database CPU per transition, two to three times what inserting the job
row and its event cost. The PL/pgSQL versions keep their plans for the session and
compute the same arrays.
"""
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

PLPGSQL = """
CREATE OR REPLACE FUNCTION ffworker_observation(x double precision, bounds double precision[]) RETURNS bigint[]
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    counts bigint[] := array_fill(0::bigint, ARRAY[cardinality(bounds) + 1]);
    bucket int := 1;
    bound double precision;
BEGIN
    IF x IS NULL THEN
        RETURN counts;
    END IF;
    FOREACH bound IN ARRAY bounds LOOP
        IF bound < x THEN
            bucket := bucket + 1;
        END IF;
    END LOOP;
    counts[bucket] := 1;
    RETURN counts;
END;
$$;

CREATE OR REPLACE FUNCTION ffworker_add_counts(a bigint[], b bigint[]) RETURNS bigint[]
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    total bigint[];
BEGIN
    FOR i IN 1 .. greatest(coalesce(cardinality(a), 0), coalesce(cardinality(b), 0)) LOOP
        total[i] := coalesce(a[i], 0) + coalesce(b[i], 0);
    END LOOP;
    RETURN total;
END;
$$;
"""

# 0002's definitions, restored by the downgrade.
SQL = """
CREATE OR REPLACE FUNCTION ffworker_observation(x double precision, bounds double precision[]) RETURNS bigint[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT array_agg(CASE WHEN x IS NOT NULL
                           AND i = 1 + (SELECT count(*) FROM unnest(bounds) AS b WHERE b < x)
                          THEN 1 ELSE 0 END::bigint ORDER BY i)
    FROM generate_series(1, cardinality(bounds) + 1) AS i
$$;

CREATE OR REPLACE FUNCTION ffworker_add_counts(a bigint[], b bigint[]) RETURNS bigint[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT array_agg(coalesce(x, 0) + coalesce(y, 0) ORDER BY i)
    FROM unnest(a, b) WITH ORDINALITY AS u(x, y, i)
$$;
"""


def upgrade() -> None:
    op.execute(PLPGSQL)


def downgrade() -> None:
    op.execute(SQL)
