"""A retry clears what its killed predecessor was writing: the partial `.ffwtmp.<job>.<n>.*`
file of an earlier attempt disappears when the next attempt names its own, not an hour later
when the orphan cleanup would find it (found by bench/chaos: partial_outputs = 1)."""
from __future__ import annotations

import pytest

from ffworker import paths, worker
from tests.integration.test_ledger import backdate, new_job, transitions

pytestmark = pytest.mark.integration

TRANSCODE = {"input": "in.mp4", "output": "out/small.mp4", "video": {"codec": "h264", "height": 120}}


def test_the_next_attempt_removes_its_predecessors_partial_output(engine, ledger, settings, tenant, make_clip):
    make_clip(tenant.media / "in.mp4", seconds=1)
    job = new_job(ledger, tenant, kind="transcode", spec=TRANSCODE)
    claim = ledger.claim(job["id"], "killed-worker")
    # What a worker killed mid-encode leaves: half an output under attempt 1's temporary name.
    partial = paths.temp_path_for(tenant.media / "out/small.mp4", str(job["id"]), claim.token)
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"\0" * 4096)
    ledger.fail(job["id"], claim.token, code="ffmpeg_killed", message="ffmpeg was killed by signal 9",
                retryable=True)
    backdate(engine, job["id"], run_after=1)  # skip the retry backoff

    report = worker.run(job["id"], ledger, settings)

    assert report.outcome == "completed", report.row and report.row["error_message"]
    assert transitions(ledger, job["id"])[-1] == ("running", "completed", 2)
    assert not partial.exists()
    assert sorted(p.name for p in tenant.media.rglob("*") if ".ffwtmp." in p.name) == []
