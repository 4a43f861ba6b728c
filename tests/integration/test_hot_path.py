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


def counting_wrapper(tmp_path: Path, binary: str) -> tuple[str, Path]:
    """A stand-in that runs the real ``binary`` and appends what it prints on stdout to a log."""
    log = tmp_path / f"{binary}.stdout"
    script = tmp_path / f"{binary}-counted"
    script.write_text(f'#!/bin/sh\necho run >> "{log}.runs"\n{binary} "$@" | tee -a "{log}"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script), log


def test_ffmpeg_prints_one_progress_block_per_heartbeat_interval(tmp_path, monkeypatch):
    # ffmpeg's default is a block every 0.5 s, each parsed and then dropped by a run that
    # passes on one snapshot per interval. 3 s of real-time input at an interval of 1.5 s:
    # two blocks and the final one (seven at the default period).
    binary, log = counting_wrapper(tmp_path, "ffmpeg")
    monkeypatch.setattr(process, "FFMPEG", binary)
    seen = []

    outcome = process.run_ffmpeg(
        ["-re", "-f", "lavfi", "-i", "testsrc2=size=64x64:rate=10:duration=3", "-f", "null", "-"],
        duration_s=3.0, tick=lambda progress: seen.append(progress) and None, tick_interval_s=1.5, timeout_s=30,
    )

    assert outcome.returncode == 0 and outcome.stopped is None
    blocks = log.read_text().count("progress=")
    assert 2 <= blocks <= 3
    assert outcome.last_progress.ended and outcome.last_progress.percent == 100.0
