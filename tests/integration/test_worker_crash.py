"""A worker that dies at the worst moment: its outputs are in place, its completion is not
recorded. The run happens in this process (real PostgreSQL, real ffmpeg); the death is a
BaseException raised where the completion write would be, so nothing after it runs —
as if the process had been killed right there."""
from __future__ import annotations

import pytest

from ffworker import process, worker
from ffworker.ledger import Ledger
from tests.integration.test_ledger import new_job, transitions
from tests.integration.test_maintenance import reaper_running, requeue_dead_run  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration

TRANSCODE = {"input": "in.mp4", "output": "out/small.mp4", "video": {"codec": "h264", "height": 120}}


class WorkerDied(BaseException):
    """Stands for SIGKILL: no except clause of the worker catches it."""


class DiesBeforeRecordingCompletion(Ledger):
    def complete(self, *args, **kwargs):
        raise WorkerDied


def test_a_retry_replaces_the_outputs_its_dead_predecessor_placed(
        engine, ledger, settings, tenant, make_clip, reaper_running):  # noqa: F811
    make_clip(tenant.media / "in.mp4", seconds=1)
    job = new_job(ledger, tenant, kind="transcode", spec=TRANSCODE)
    output = tenant.media / "out/small.mp4"

    with pytest.raises(WorkerDied):
        worker.run(job["id"], DiesBeforeRecordingCompletion(engine), settings)
    assert output.exists()  # placed, but the ledger still says running
    row = ledger.get(job["id"])
    assert (row["status"], row["outputs_placed_attempt"]) == ("running", 1)

    requeue_dead_run(engine, ledger, settings, job["id"])
    report = worker.run(job["id"], ledger, settings)

    assert report.outcome == "completed", report.row and report.row["error_message"]
    assert transitions(ledger, job["id"]) == [
        (None, "queued", 0), ("queued", "running", 1), ("running", "queued", 1),
        ("queued", "running", 2), ("running", "completed", 2),
    ]
    assert process.ffprobe(str(output), timeout_s=10)["streams"][0]["height"] == 120
    assert sorted(p.name for p in tenant.media.rglob("*") if ".ffwtmp." in p.name) == []


def test_an_existing_file_the_job_never_placed_is_still_refused(engine, ledger, settings, tenant, make_clip):
    make_clip(tenant.media / "in.mp4", seconds=1)
    job = new_job(ledger, tenant, kind="transcode", spec=TRANSCODE)
    # Someone else's file appears at the output path after submission.
    (tenant.media / "out").mkdir()
    (tenant.media / "out/small.mp4").write_bytes(b"not ours")

    report = worker.run(job["id"], ledger, settings)

    assert report.outcome == "failed"
    assert report.row["error_code"] == "invalid_request"
    assert (tenant.media / "out/small.mp4").read_bytes() == b"not ours"
