"""hls through the whole stack: REST API → ledger → a real worker → an HLS ladder on disk."""
from __future__ import annotations

import subprocess

import pytest

from ffworker import process
from tests.e2e.test_worker import finished, leftovers, submit

pytestmark = pytest.mark.e2e


def stream_inf(master: str) -> list[dict[str, str]]:
    from ffworker.kinds.hls import parse_master

    return list(parse_master(master)[1].values())


def test_ladder_with_master_playlist_and_no_upscaling(worker, client, tenant, make_clip, settings):
    make_clip(tenant.media / "hls/talk.mp4", seconds=3, size="640x360")
    job = submit(client, tenant, kind="hls", input="hls/talk.mp4", output_dir="hls/ladders/talk",
                 renditions=[240, 360, 720], segment_s=1)
    done = finished(client, tenant, job["id"])
    assert done["status"] == "completed", done["error"]
    result = done["result"]
    assert result["renditions"] == [240, 360] and result["renditions_dropped"] == [720]
    assert result["master_playlist"] == "hls/ladders/talk/master.m3u8"
    assert [(p["path"], p["width"], p["height"]) for p in result["playlists"]] == [
        ("hls/ladders/talk/240p.m3u8", 426, 240), ("hls/ladders/talk/360p.m3u8", 640, 360)]
    directory = tenant.media / "hls/ladders/talk"
    assert {p.name for p in directory.iterdir() if p.suffix == ".m3u8"} == {"master.m3u8", "240p.m3u8", "360p.m3u8"}
    assert all(p["segments"] == 3 for p in result["playlists"])

    master = (directory / "master.m3u8").read_text()
    variants = stream_inf(master)
    assert [v["RESOLUTION"] for v in variants] == ["426x240", "640x360"]
    for variant in variants:
        assert int(variant["BANDWIDTH"]) > 0
        assert variant["CODECS"].startswith("avc1.") and "mp4a.40.2" in variant["CODECS"]
    probe = process.ffprobe(str(directory / "master.m3u8"), formats="hls,mpegts")
    assert probe["format"]["format_name"] == "hls"
    assert {s["height"] for s in probe["streams"] if s["codec_type"] == "video"} == {240, 360}
    assert float(probe["format"]["duration"]) == pytest.approx(3.0, abs=0.1)
    (output,) = result["outputs"]
    assert output["path"] == "hls/ladders/talk/master.m3u8" and output["size_bytes"] > 0
    assert leftovers(tenant.media) == []
    assert str(settings.media_root) not in str(result)

    # The directory now exists: refused unless overwrite, then replaced as a whole.
    again = {"kind": "hls", "input": "hls/talk.mp4", "output_dir": "hls/ladders/talk", "renditions": [240]}
    response = client.post("/v1/jobs", headers=tenant.headers, json=again)
    assert response.status_code == 422 and "output_dir" in response.json["errors"]
    (directory / "stale.txt").write_text("from the previous ladder")
    job = submit(client, tenant, **again, overwrite=True)
    done = finished(client, tenant, job["id"])
    assert done["status"] == "completed", done["error"]
    assert not (directory / "stale.txt").exists() and not (directory / "360p.m3u8").exists()
    assert [v["RESOLUTION"] for v in stream_inf((directory / "master.m3u8").read_text())] == ["426x240"]
    assert leftovers(tenant.media) == []


def test_output_dir_rules_are_checked_at_submit(client, tenant, make_clip, settings):
    make_clip(tenant.media / "hls/in.mp4", seconds=1)
    (tenant.media / "hls/photos").mkdir(exist_ok=True)
    (tenant.media / "hls/photos/keep.jpg").write_bytes(b"x")
    make_clip(tenant.media / "hls/ladder/in.mp4", seconds=1)
    (tenant.media / "hls/ladder/master.m3u8").write_text("#EXTM3U\n")
    for body, words in (
        ({"output_dir": "hls/photos", "overwrite": True}, "holds no master.m3u8"),
        ({"output_dir": "../globex/hls"}, "must not contain '..'"),
        ({"output_dir": "hls/in.mp4", "overwrite": True}, "not a directory"),
        ({"output_dir": "hls/pct%v"}, "'%'"),
        ({"output_dir": "hls/ladder", "input": "hls/ladder/in.mp4", "overwrite": True}, "inside output_dir"),
        ({"output_dir": "hls/x", "renditions": [361]}, "even"),
        ({"output_dir": "hls/x", "renditions": []}, "Length must be between 1 and 8"),
        ({"output_dir": "hls/x", "segment_s": 0}, "greater than or equal to 1"),
    ):
        response = client.post("/v1/jobs", headers=tenant.headers,
                               json={"kind": "hls", "input": "hls/in.mp4", **body})
        assert response.status_code == 422, (body, response.json)
        assert words in response.json["message"], (body, response.json)
        assert str(settings.media_root) not in response.get_data(as_text=True)
    assert (tenant.media / "hls/photos/keep.jpg").exists()


def test_a_failed_ladder_leaves_nothing(worker, client, tenant):
    (tenant.media / "hls").mkdir(parents=True, exist_ok=True)
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "sine=duration=1", "-c:a", "aac",
                    str(tenant.media / "hls/voice.m4a")], check=True)
    job = submit(client, tenant, kind="hls", input="hls/voice.m4a", output_dir="hls/voice")
    done = finished(client, tenant, job["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "invalid_input"
    assert "no video stream" in done["error"]["message"]
    assert not (tenant.media / "hls/voice").exists() and leftovers(tenant.media) == []


def test_a_ladder_killed_midway_leaves_nothing(worker, client, tenant, make_clip):
    # Three renditions of 12 s of 720p: several seconds of encoding even on a many-core machine.
    make_clip(tenant.media / "hls/long.mp4", seconds=12, size="1280x720")
    job = submit(client, tenant, kind="hls", input="hls/long.mp4", output_dir="hls/late", timeout_s=1,
                 renditions=[360, 540, 720])
    done = finished(client, tenant, job["id"], timeout_s=20)
    assert done["status"] == "failed" and done["error"]["code"] == "timeout"
    assert not (tenant.media / "hls/late").exists() and leftovers(tenant.media) == []
