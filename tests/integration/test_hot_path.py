"""What a run writes every progress interval, and what it starts per job, stays cheap:
the heartbeat is a statement built once, and a file already probed is not probed again.

Against the real PostgreSQL and real ffprobe (counted through a small wrapper script that
runs the real binary).
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from sqlalchemy import text

from ffworker import ledger as ledger_module
from ffworker import process, worker
from tests.integration.test_ledger import new_job

pytestmark = pytest.mark.integration


def _built_per_call(*_args, **_kwargs):
    raise AssertionError("a statement was built during the call")


def test_the_heartbeat_builds_no_statement_per_call(engine, ledger, tenant, monkeypatch):
    job = new_job(ledger, tenant)
    claim = ledger.claim(job["id"], "w")
    monkeypatch.setattr(ledger_module, "update", _built_per_call)

    ledger.heartbeat(job["id"], claim.token)
    ledger.heartbeat(job["id"], claim.token, {"percent": 42.5, "frame": 10, "fps": 25.0, "speed": 2.0,
                                              "out_time_s": 4.25, "eta_s": 2.9}, media_duration_s=10.0)
    with_progress = ledger.get(job["id"])
    ledger.heartbeat(job["id"], claim.token)  # no progress: the snapshot stays as it was
    ledger.heartbeat(job["id"], claim.token, placing_outputs=True, placed_result={"outputs": []})

    row = ledger.get(job["id"])
    assert (row["progress_percent"], row["progress_frame"], row["progress_out_time_s"]) == (42.5, 10, 4.25)
    assert row["progress_at"] == with_progress["progress_at"]
    assert row["media_duration_s"] == 10.0
    assert (row["outputs_placed_attempt"], row["result"]) == (claim.token, {"outputs": []})
