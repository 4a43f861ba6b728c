"""The histogram helpers the ``job_events`` trigger calls on every transition: the PL/pgSQL
versions (migration 0005) give exactly what 0002's SQL versions gave."""
from __future__ import annotations

import pytest
from sqlalchemy import text

pytestmark = pytest.mark.integration

BOUNDS = [0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600]

# 0002's definitions, inlined: the reference the functions must match.
SQL_OBSERVATION = """
    SELECT array_agg(CASE WHEN x IS NOT NULL
                           AND i = 1 + (SELECT count(*) FROM unnest(bounds) AS b WHERE b < x)
                          THEN 1 ELSE 0 END::bigint ORDER BY i)
      FROM generate_series(1, cardinality(bounds) + 1) AS i
"""
SQL_ADD_COUNTS = "SELECT array_agg(coalesce(x, 0) + coalesce(y, 0) ORDER BY i) FROM unnest(a, b) WITH ORDINALITY AS u(x, y, i)"


def counts(bucket: int | None) -> list[int]:
    """One observation in ``bucket`` (0-based; the last one is above every bound), or none."""
    return [1 if i == bucket else 0 for i in range(len(BOUNDS) + 1)]


@pytest.mark.parametrize("x, bucket", [
    (None, None), (-5.0, 0), (0.0, 0), (0.1, 0), (0.1000001, 1), (7200.0, 14), (21600.5, 16),
    (float("inf"), 16), (float("nan"), 16),
])
def test_an_observation_lands_in_the_first_bucket_whose_bound_it_does_not_exceed(engine, x, bucket):
    with engine.connect() as conn:
        bounds = conn.execute(text("SELECT ffworker_seconds_bounds()")).scalar_one()
        got = conn.execute(text("SELECT ffworker_observation(:x, ffworker_seconds_bounds())"), {"x": x}).scalar_one()
        reference = conn.execute(text(f"SELECT ({SQL_OBSERVATION}) FROM (SELECT CAST(:x AS double precision) AS x, "
                                      "ffworker_seconds_bounds() AS bounds) AS args"), {"x": x}).scalar_one()
    assert bounds == BOUNDS
    assert got == reference == counts(bucket)


@pytest.mark.parametrize("a, b, expected", [
    ([1, 2, 0], [3, 0, 5], [4, 2, 5]),
    ([1], [1, 2, 3], [2, 2, 3]),
    (None, [0, 7], [0, 7]),
    ([4, None], None, [4, 0]),
    ([], [], None),
    (None, None, None),
])
def test_counts_add_element_by_element(engine, a, b, expected):
    params = {"a": a, "b": b}
    with engine.connect() as conn:
        got = conn.execute(text("SELECT ffworker_add_counts(CAST(:a AS bigint[]), CAST(:b AS bigint[]))"),
                           params).scalar_one()
        reference = conn.execute(text(f"SELECT ({SQL_ADD_COUNTS}) FROM (SELECT CAST(:a AS bigint[]) AS a, "
                                      "CAST(:b AS bigint[]) AS b) AS args"), params).scalar_one()
    assert got == reference == expected
