"""An invalid setting stops every process at start-up with one line naming the variable."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PROCESSES = {
    "web": [sys.executable, "-m", "gunicorn", "-c", "ffworker/gunicorn_conf.py", "--bind", "127.0.0.1:0",
            "ffworker.app:create_app()"],
    "worker": [sys.executable, "-m", "celery", "-A", "ffworker.celery_app", "worker", "--loglevel", "INFO"],
    "beat": [sys.executable, "-m", "celery", "-A", "ffworker.celery_app", "beat", "--loglevel", "INFO"],
    "manage.py tenants": [sys.executable, "manage.py", "tenants", "list"],
    "manage.py reap": [sys.executable, "manage.py", "reap", "--dry-run"],
}

BAD = [
    ({"FFWORKER_REAPER_GRACE_S": "10", "FFWORKER_MAINTENANCE_INTERVAL_S": "15"},
     "ffworker: configuration error: FFWORKER_REAPER_GRACE_S=10 must be greater than "
     "FFWORKER_MAINTENANCE_INTERVAL_S=15"),
    ({"FFWORKER_STALE_AFTER_S": "2", "FFWORKER_PROGRESS_INTERVAL_S": "1"},
     "ffworker: configuration error: FFWORKER_STALE_AFTER_S=2 must be at least 3 × FFWORKER_PROGRESS_INTERVAL_S=1"),
    ({"FFWORKER_BROKER_URL": "http://broker/"},
     "ffworker: configuration error: FFWORKER_BROKER_URL=http://broker/ must use one of the schemes redis, rediss, "
     "sentinel, amqp, amqps, pyamqp"),
]


def run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    # Nothing may be reached even if validation let a setting through: a closed port for the database.
    environ = {**os.environ, "FFWORKER_DATABASE_URL": "postgresql+psycopg://127.0.0.1:9/none", **env}
    return subprocess.run(argv, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("name", PROCESSES)
def test_each_process_refuses_to_start(name):
    env, line = BAD[0]
    done = run(PROCESSES[name], env)
    assert done.returncode != 0
    assert done.stderr.strip() == line, done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize("env, line", BAD[1:])
def test_each_rule_reaches_the_web_process_as_one_line(env, line):
    done = run(PROCESSES["web"], env)
    assert done.returncode != 0 and done.stderr.strip() == line, done.stderr
