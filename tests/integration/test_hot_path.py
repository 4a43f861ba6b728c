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

from ffworker import ledger as ledger_module
from ffworker import media, process, worker
from ffworker.kinds.base import INPUT_FORMATS
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


def counting_wrapper(tmp_path: Path, binary: str, *, keep_stdout: bool = True) -> tuple[str, Path]:
    """A stand-in that runs the real ``binary``, appending a line per run to ``<log>.runs``
    and (``keep_stdout``) what it prints on stdout to the log."""
    log = tmp_path / f"{binary}.stdout"
    run = f'{binary} "$@" | tee -a "{log}"' if keep_stdout else f'exec {binary} "$@"'
    script = tmp_path / f"{binary}-counted"
    script.write_text(f'#!/bin/sh\necho run >> "{log}.runs"\n{run}\n')
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
    # One more than the ideal when a block lands on either side of the 3 s mark (a loaded machine):
    # still far from the default period's seven.
    assert 2 <= blocks <= 4
    assert outcome.last_progress.ended and outcome.last_progress.percent == 100.0


def runs_of(log: Path) -> int:
    runs = Path(f"{log}.runs")
    return len(runs.read_text().splitlines()) if runs.exists() else 0


def run_job(ledger, settings, tenant, kind: str, spec: dict) -> dict:
    job = new_job(ledger, tenant, kind=kind, spec=spec)
    report = worker.run(job["id"], ledger, settings)
    assert report.outcome == "completed", ledger.get(job["id"])
    return ledger.get(job["id"])


def test_a_file_probed_once_is_described_from_the_cache(ledger, settings, tenant, make_clip, tmp_path, monkeypatch):
    make_clip(tenant.media / "in.mp4", seconds=1.0)
    binary, log = counting_wrapper(tmp_path, "ffprobe", keep_stdout=False)
    monkeypatch.setattr(process, "FFPROBE", binary)

    first = run_job(ledger, settings, tenant, "probe", {"input": "in.mp4"})
    second = run_job(ledger, settings, tenant, "probe", {"input": "in.mp4"})

    assert runs_of(log) == 1
    expected = media.summarize(process.ffprobe(str(tenant.media / "in.mp4"), formats=INPUT_FORMATS))
    assert first["result"]["media"] == second["result"]["media"] == expected


def test_a_changed_file_is_probed_again(ledger, settings, tenant, make_clip, tmp_path, monkeypatch):
    clip = tenant.media / "in.mp4"
    make_clip(clip, seconds=1.0, size="320x240")
    binary, log = counting_wrapper(tmp_path, "ffprobe", keep_stdout=False)
    monkeypatch.setattr(process, "FFPROBE", binary)
    run_job(ledger, settings, tenant, "probe", {"input": "in.mp4"})

    # Rewritten in place with other content (same inode), then its mtime set back: the
    # new size and ctime still tell.
    before = clip.stat()
    other = make_clip(tmp_path / "other.mp4", seconds=1.0, size="160x120")
    clip.write_bytes(other.read_bytes())
    os.utime(clip, ns=(before.st_atime_ns, before.st_mtime_ns))
    rewritten = run_job(ledger, settings, tenant, "probe", {"input": "in.mp4"})
    # Replaced by a rename (another inode).
    (tenant.media / "next.mp4").write_bytes(clip.read_bytes())
    os.replace(tenant.media / "next.mp4", clip)
    replaced = run_job(ledger, settings, tenant, "probe", {"input": "in.mp4"})

    assert runs_of(log) == 3
    video = [s for s in rewritten["result"]["media"]["streams"] if s["type"] == "video"][0]
    assert (video["width"], video["height"]) == (160, 120)
    assert replaced["result"]["media"] == rewritten["result"]["media"]


def test_a_concat_names_the_unreadable_input_when_the_others_are_cached(ledger, settings, tenant, make_clip):
    make_clip(tenant.media / "a.mp4")
    make_clip(tenant.media / "b.mp4")
    (tenant.media / "broken.mp4").write_bytes(b"not media at all")
    run_job(ledger, settings, tenant, "concat", {"inputs": ["a.mp4", "b.mp4"], "output": "first.mp4"})
    job = new_job(ledger, tenant, kind="concat", spec={"inputs": ["a.mp4", "b.mp4", "broken.mp4"], "output": "m.mp4"})

    worker.run(job["id"], ledger, settings)

    row = ledger.get(job["id"])
    assert (row["status"], row["error_code"]) == ("failed", "invalid_input")
    assert "input 3 ('broken.mp4')" in row["error_message"]


@pytest.mark.parametrize("output, runs_for_output, runs_for_next_job", [
    ("out/small.mkv", 1, 0),   # described by ffprobe, whose probe the next job reads from the cache
    ("out/small.mp4", 0, 1),   # described from its header (ffworker.isobmff): no process at all
])
def test_an_output_is_described_once_at_most(ledger, settings, tenant, make_clip, tmp_path, monkeypatch,
                                             output, runs_for_output, runs_for_next_job):
    make_clip(tenant.media / "in.mp4", seconds=1.0)
    binary, log = counting_wrapper(tmp_path, "ffprobe", keep_stdout=False)
    monkeypatch.setattr(process, "FFPROBE", binary)
    transcoded = run_job(ledger, settings, tenant, "transcode",
                         {"input": "in.mp4", "output": output, "video": {"codec": "h264", "height": 120}})
    assert runs_of(log) == 1 + runs_for_output  # the input, then the output if it has to be

    probed = run_job(ledger, settings, tenant, "probe", {"input": output})

    assert runs_of(log) == 1 + runs_for_output + runs_for_next_job
    expected = process.ffprobe(str(tenant.media / output), formats=INPUT_FORMATS)
    assert probed["result"]["media"] == media.summarize(expected)
    assert transcoded["result"]["outputs"][0] == media.output_summary(
        output, expected, (tenant.media / output).stat().st_size)


def test_a_probe_cache_that_cannot_store_leaves_the_completed_outcome(ledger, settings, tenant, make_clip,
                                                                      monkeypatch):
    make_clip(tenant.media / "in.mp4")

    def refuse(*_args, **_kwargs):
        raise RuntimeError("the probe cache is broken")

    monkeypatch.setattr(ledger, "store_probes", refuse)
    job = new_job(ledger, tenant, kind="probe", spec={"input": "in.mp4"})

    report = worker.run(job["id"], ledger, settings)

    assert report.outcome == "completed"
    assert ledger.get(job["id"])["status"] == "completed"
