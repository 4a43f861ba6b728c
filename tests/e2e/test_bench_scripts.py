"""Every bench/ script still runs: each one's --quick mode, end to end, against the real
services (the figures themselves are not checked here: timing belongs to bench/, not CI)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

BENCH = Path(__file__).resolve().parents[2] / "bench"
SCRIPTS = sorted(p.name for p in BENCH.iterdir() if p.is_file() and os.access(p, os.X_OK))


def test_there_are_bench_scripts():
    assert {"overhead", "job_latency", "merge", "chaos"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_quick_mode_runs_and_prints_its_figures(script, settings, clean_ledger):
    # clean_ledger: a worker claims the best eligible job of the whole ledger, whatever queue
    # its message came from, so a script's worker would first run what earlier tests left queued.
    # The scripts make their own tenants (and queues or databases) in the run's database.
    env = {**os.environ, "FFWORKER_DATABASE_URL": settings.database_url}
    env.pop("FFWORKER_TASK_QUEUE", None)
    done = subprocess.run([sys.executable, str(BENCH / script), "--quick"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert any(ch.isdigit() for ch in done.stdout), done.stdout
