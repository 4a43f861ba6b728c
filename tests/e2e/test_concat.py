"""concat through the whole stack: REST API → ledger → a real worker → ffmpeg's concat demuxer or filter."""
from __future__ import annotations

import re
import subprocess
import time

import pytest

from ffworker import process
from ffworker.kinds import concat
from ffworker.kinds.concat import Clip
from tests.e2e.test_worker import finished, leftovers, submit
from tests.helpers import ffmpeg_processes_touching, wait_until

pytestmark = pytest.mark.e2e

FRAME_25 = 1 / 25


def streams(path) -> dict[str, float]:
    """Duration of the output's video and audio streams, as ffprobe reads them."""
    probe = process.ffprobe(str(path))
    return {s["codec_type"]: float(s["duration"]) for s in probe["streams"]}


def silences(path) -> list[tuple[float, float]]:
    """(start, end) of the silent stretches of the output's audio."""
    run = subprocess.run(["ffmpeg", "-hide_banner", "-nostats", "-i", str(path), "-map", "0:a:0",
                          "-af", "silencedetect=noise=-50dB:d=0.2", "-f", "null", "-"],
                         capture_output=True, text=True, check=True)
    starts = [float(x) for x in re.findall(r"silence_start: ([\d.]+)", run.stderr)]
    ends = [float(x) for x in re.findall(r"silence_end: ([\d.]+)", run.stderr)]
    ends += [float("inf")] * (len(starts) - len(ends))
    return list(zip(starts, ends))


def test_compatible_clips_are_stream_copied_with_the_summed_duration(worker, client, ledger, tenant, make_clip):
    names = [f"concat/parts/{n}.mp4" for n in ("one", "two", "three")]
    for name in names:
        make_clip(tenant.media / name, seconds=2, size="320x240")
    job = submit(client, tenant, kind="concat", inputs=names, output="concat/merged/all.mp4")
    done = finished(client, tenant, job["id"])
    assert done["status"] == "completed", done["error"]
    assert done["result"]["mode"] == "copy" and "stream-copied" in done["result"]["reason"]
    (output,) = done["result"]["outputs"]
    assert output["path"] == "concat/merged/all.mp4" and (output["width"], output["height"]) == (320, 240)
    durations = streams(tenant.media / "concat/merged/all.mp4")
    assert durations["video"] == pytest.approx(6.0, abs=FRAME_25)
    assert durations["audio"] == pytest.approx(6.0, abs=FRAME_25)
    assert output["duration_s"] == pytest.approx(6.0, abs=FRAME_25)
    row = ledger.get(job["id"])
    assert row["media_duration_s"] == pytest.approx(6.0, abs=0.01)  # percent is measured against the sum
    assert done["progress"]["percent"] == 100.0
    assert leftovers(tenant.media) == []  # neither the temp output nor the list file remain


def test_different_sizes_rates_and_a_clip_without_audio_are_reencoded_in_sync(worker, client, tenant, make_clip):
    make_clip(tenant.media / "concat/a.mp4", seconds=2, size="320x240", rate=25)
    make_clip(tenant.media / "concat/b.mp4", seconds=1, size="640x360", rate=30)
    make_clip(tenant.media / "concat/c.mp4", seconds=1.5, size="320x240", rate=25, audio=False)
    job = submit(client, tenant, kind="concat", inputs=["concat/a.mp4", "concat/b.mp4", "concat/c.mp4"],
                 output="concat/mixed.mp4")
    done = finished(client, tenant, job["id"])
    assert done["status"] == "completed", done["error"]
    result = done["result"]
    assert result["mode"] == "reencode"
    assert "input 2 ('concat/b.mp4') differs in width 640 (input 1: 320)" in result["reason"]
    assert "input 3 ('concat/c.mp4') differs in" in result["reason"] and "audio track absent" in result["reason"]
    assert result["normalised_to"]["width"] == 320 and result["normalised_to"]["fps"] == "25"
    (output,) = result["outputs"]
    assert (output["width"], output["height"]) == (320, 240)
    durations = streams(tenant.media / "concat/mixed.mp4")
    assert durations["video"] == pytest.approx(4.5, abs=FRAME_25)
    assert durations["audio"] == pytest.approx(durations["video"], abs=FRAME_25)
    # The clip without audio got silence for exactly its length, where it plays: A/V stay in sync.
    ((start, end),) = silences(tenant.media / "concat/mixed.mp4")
    assert start == pytest.approx(3.0, abs=FRAME_25)
    assert end == float("inf") or end == pytest.approx(4.5, abs=FRAME_25)


def test_names_with_spaces_quotes_and_non_ascii_characters_work(worker, client, tenant, make_clip):
    names = ["concat/it's a clip.mp4", "concat/dir with space/über 'quoted'.mp4"]
    for name in names:
        make_clip(tenant.media / name, seconds=1)
    job = submit(client, tenant, kind="concat", inputs=names, output="concat/Ünïcode 'merged'.mp4", mode="copy")
    done = finished(client, tenant, job["id"])
    assert done["status"] == "completed", done["error"]
    assert done["result"]["outputs"][0]["path"] == "concat/Ünïcode 'merged'.mp4"
    assert streams(tenant.media / "concat/Ünïcode 'merged'.mp4")["video"] == pytest.approx(2.0, abs=FRAME_25)
    assert leftovers(tenant.media) == []


def test_copy_of_incompatible_inputs_fails_with_a_clear_code(worker, client, tenant, make_clip, settings):
    make_clip(tenant.media / "concat/small.mp4", seconds=1, size="320x240")
    make_clip(tenant.media / "concat/large.mp4", seconds=1, size="640x360")
    job = submit(client, tenant, kind="concat", inputs=["concat/small.mp4", "concat/large.mp4"],
                 output="concat/never.mp4", mode="copy")
    done = finished(client, tenant, job["id"])
    assert done["status"] == "failed" and done["attempts"] == 1
    assert done["error"]["code"] == "incompatible_inputs"
    assert "input 2 ('concat/large.mp4') differs in width 640 (input 1: 320)" in done["error"]["message"]
    assert str(settings.media_root) not in done["error"]["message"]
    assert not (tenant.media / "concat/never.mp4").exists() and leftovers(tenant.media) == []


def test_a_playlist_disguised_as_a_clip_is_refused_not_followed(worker, client, tenant, make_clip, other_tenant):
    make_clip(other_tenant.media / "concat/secret.mp4", seconds=1)
    make_clip(tenant.media / "concat/ok.mp4", seconds=1)
    (tenant.media / "concat/evil.mp4").write_text(
        f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\n{other_tenant.media / 'concat/secret.mp4'}\n#EXT-X-ENDLIST\n")
    job = submit(client, tenant, kind="concat", inputs=["concat/ok.mp4", "concat/evil.mp4"], output="concat/stolen.mp4")
    done = finished(client, tenant, job["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "invalid_input"
    assert not (tenant.media / "concat/stolen.mp4").exists()


def test_fewer_than_two_inputs_is_422(client, tenant, make_clip, engine):
    make_clip(tenant.media / "concat/only.mp4", seconds=1)
    for inputs in (["concat/only.mp4"], []):
        response = client.post("/v1/jobs", headers=tenant.headers,
                               json={"kind": "concat", "inputs": inputs, "output": "concat/x.mp4"})
        assert response.status_code == 422, response.json
        assert "inputs" in response.json["errors"]


def test_unsafe_or_missing_inputs_and_outputs_are_422(client, tenant, make_clip, settings):
    make_clip(tenant.media / "concat/a.mp4", seconds=1)
    a = "concat/a.mp4"
    for body, field in (
        ({"inputs": [a, "../globex/b.mp4"], "output": "concat/x.mp4"}, "inputs"),
        ({"inputs": [a, "concat/missing.mp4"], "output": "concat/x.mp4"}, "inputs"),
        ({"inputs": [a, "concat:concat/a.mp4|concat/a.mp4"], "output": "concat/x.mp4"}, "inputs"),
        ({"inputs": [a, a], "output": "concat/x.gif"}, "output"),
        ({"inputs": [a, a], "output": a, "overwrite": True}, "output"),
        ({"inputs": [a, a], "output": "concat/x.mp4", "mode": "copy", "height": 480}, "height"),
        ({"inputs": [a, a], "output": "concat/x.mp4", "mode": "fastest"}, "mode"),
    ):
        response = client.post("/v1/jobs", headers=tenant.headers, json={"kind": "concat", **body})
        assert response.status_code == 422, (body, response.json)
        assert field in response.json["errors"], (body, response.json)
        assert str(settings.media_root) not in response.get_data(as_text=True)


def test_cancel_mid_merge_leaves_nothing(worker, client, ledger, tenant, make_clip):
    for name in ("concat/long-1.mp4", "concat/long-2.mp4"):
        make_clip(tenant.media / name, seconds=8, size="640x360")
    job = submit(client, tenant, kind="concat", inputs=["concat/long-1.mp4", "concat/long-2.mp4"],
                 output="concat/out/slow.mp4", mode="reencode", width=1920, height=1080, preset="veryslow")
    wait_until(lambda: ledger.get(job["id"])["status"] == "running", 30)
    wait_until(lambda: ffmpeg_processes_touching(job["id"]), 10)
    requested = time.monotonic()
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=tenant.headers).status_code == 202
    done = finished(client, tenant, job["id"], timeout_s=5)
    assert done["status"] == "cancelled" and time.monotonic() - requested < 2.0
    assert ffmpeg_processes_touching(job["id"]) == []
    assert not (tenant.media / "concat/out/slow.mp4").exists()
    assert leftovers(tenant.media) == []


def test_ffmpeg_reads_the_quoted_list_back(tmp_path):
    """The concat demuxer, fed the list, opens exactly the files named (quotes, spaces, non-ASCII)."""
    names = ["it's a clip.mp4", "über ' '' x.mp4"]
    for name in names:
        subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=64x48:rate=5:duration=0.4",
                        "-c:v", "libx264", "-preset", "ultrafast", str(tmp_path / name)], check=True)
    listing = tmp_path / "list.ffconcat"
    listing.write_bytes(concat.concat_list([Clip(i, n, tmp_path / n, 1, None, None, ())
                                            for i, n in enumerate(names)]))
    probe = subprocess.run(["ffprobe", "-v", "error", "-f", "concat", "-safe", "0", "-i", str(listing),
                            "-count_frames", "-show_entries", "stream=nb_read_frames", "-of", "csv=p=0"],
                           capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "4"


def test_inputs_are_probed_side_by_side_in_order_and_a_failure_names_its_input(tmp_path, make_clip):
    sizes = ["64x48", "96x64", "128x96"]
    clips = [str(make_clip(tmp_path / f"{i}.mp4", seconds=1, size=size)) for i, size in enumerate(sizes)]
    probes = process.ffprobe_many(clips * 3, parallel=4)
    assert [p["streams"][0]["width"] for p in probes] == [64, 96, 128] * 3
    (tmp_path / "broken.mp4").write_bytes(b"not media")
    with pytest.raises(process.ProbeFailed) as raised:
        process.ffprobe_many([clips[0], str(tmp_path / "broken.mp4"), clips[1]], parallel=2)
    assert raised.value.index == 1
