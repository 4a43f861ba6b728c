"""`manage.py report`: the reporting views as a table, CSV or JSON, with --since and --tenant."""
from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timedelta, timezone

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from ffworker.cli import cli
from ffworker.terminal import progress_fields

pytestmark = pytest.mark.integration


def report(*args):
    return CliRunner().invoke(cli, ["report", *args], catch_exceptions=False)


@pytest.fixture
def recent(engine, ledger, tenant, other_tenant):
    """Jobs submitted 1 hour, 3 days and 20 days ago (real clock), one still running and stuck."""
    def job(owner, age: timedelta, kind="probe", complete=True):
        row, _ = ledger.create(tenant_id=owner.id, kind=kind, spec={"input": "a.mp4"}, workspace="default",
                               priority=0, metadata={}, max_attempts=3, timeout_s=60)
        claim = ledger.claim(row["id"], "host-c:9")
        if complete:
            ledger.heartbeat(row["id"], claim.token, {"percent": 99.0, "speed": 4.0}, media_duration_s=6.0)
            ledger.complete(row["id"], claim.token, {"outputs": []})
        with engine.begin() as conn:  # move the whole history back in time
            shift = {"age": age, "id": row["id"]}
            conn.execute(text("""
                UPDATE jobs SET created_at = created_at - :age, run_after = run_after - :age,
                                started_at = started_at - :age, heartbeat_at = heartbeat_at - :age,
                                finished_at = finished_at - :age WHERE id = :id"""), shift)
            conn.execute(text("UPDATE job_events SET at = at - :age WHERE job_id = :id"), shift)
        return row["id"]

    return {
        "new": job(tenant, timedelta(hours=1)),
        "three_days": job(tenant, timedelta(days=3), kind="transcode"),
        "old": job(tenant, timedelta(days=20)),
        "other": job(other_tenant, timedelta(hours=2)),
        "stuck": job(tenant, timedelta(minutes=10), complete=False),
    }


def utc_day(age: timedelta) -> str:
    return (datetime.now(timezone.utc) - age).date().isoformat()


def test_json_report_of_the_last_week(recent):
    result = report("--format", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == {"daily", "usage", "wait", "stuck"}
    days = {(row["day"], row["tenant"], row["kind"], row["status"]): row["jobs"] for row in data["daily"]}
    assert days[(utc_day(timedelta(days=3)), "acme", "transcode", "completed")] == 1
    assert days[(utc_day(timedelta(hours=2)), "globex", "probe", "completed")] == 1
    assert utc_day(timedelta(days=20)) not in {day for day, *_ in days}  # older than --since 7d
    assert all(isinstance(row["media_seconds_processed"], float) for row in data["daily"])
    assert [row["job_id"] for row in data["stuck"]] == [str(recent["stuck"])]
    assert data["stuck"][0]["worker"] == "host-c:9" and data["stuck"][0]["reaper_outcome"] == "queued"
    assert {row["tenant"] for row in data["usage"]} == {"acme", "globex"}


def test_since_and_tenant_narrow_the_report(recent):
    data = json.loads(report("--format", "json", "--since", "30d", "--tenant", "acme").stdout)
    days = {row["day"] for row in data["daily"]}
    assert utc_day(timedelta(days=20)) in days
    assert {row["tenant"] for row in data["daily"] + data["usage"] + data["stuck"]} == {"acme"}
    narrow = json.loads(report("--format", "json", "--since", "90m", "--view", "daily").stdout)
    assert set(narrow) == {"daily"}
    # 90 minutes back reaches at most into yesterday (UTC): the 3-day-old job is out
    assert all(row["kind"] == "probe" for row in narrow["daily"])


def test_csv_report_is_one_document_per_view(recent):
    single = report("--format", "csv", "--view", "usage").stdout
    rows = list(csv.DictReader(io.StringIO(single)))
    assert {row["tenant"] for row in rows} == {"acme", "globex"}
    acme = sum(int(row["jobs_submitted"]) for row in rows if row["tenant"] == "acme")
    assert acme >= 3  # the month may or may not reach back 20 days
    everything = report("--format", "csv").stdout
    blocks = everything.split("\n\n")
    assert [block.splitlines()[0] for block in blocks] == ["# daily", "# usage", "# wait", "# stuck"]
    assert blocks[2].splitlines()[1].startswith("day,tenant,claims,queue_wait_p50_s")
    assert blocks[3].splitlines()[1].startswith("job_id,tenant,workspace,kind,attempt")


def test_table_report_has_a_titled_table_per_view(recent):
    result = report()
    assert result.exit_code == 0
    for title in ("report_daily_jobs", "report_monthly_usage", "report_stuck_jobs"):
        assert title in result.stdout
    assert "host-c:9" in result.stdout


def test_report_errors_are_plain_messages(recent):
    unknown = report("--tenant", "nobody")
    assert unknown.exit_code == 1 and "no tenant named 'nobody'" in unknown.output
    bad = report("--since", "a week")
    assert bad.exit_code == 1 and "like 30m, 12h, 7d or 2w" in bad.output


@pytest.mark.parametrize("job, expected", [
    ({"status": "queued", "progress": None}, {"status": "queued", "speed": "", "eta": ""}),
    ({"status": "running", "progress": {"percent": 42.0, "speed": 1.5, "eta_s": 75.4}},
     {"status": "running", "completed": 42.0, "speed": "1.50x", "eta": "ETA 1:15"}),
    ({"status": "running", "progress": {"percent": None, "speed": 0.5, "eta_s": None}},
     {"status": "running", "speed": "0.50x", "eta": ""}),
    ({"status": "running", "progress": {"percent": 10.0, "speed": 2.0, "eta_s": 4000}},
     {"status": "running", "completed": 10.0, "speed": "2.00x", "eta": "ETA 1:06:40"}),
    ({"status": "completed", "progress": {"percent": 99.0, "speed": 2.0, "eta_s": 0}},
     {"status": "completed", "completed": 100.0, "speed": "", "eta": ""}),
])
def test_the_progress_bar_shows_percent_speed_and_eta(job, expected):
    assert progress_fields(job) == expected
