"""HLS ladders: which renditions, the ffmpeg arguments, the master playlist."""
from __future__ import annotations

from pathlib import Path

import pytest

from ffworker import paths
from ffworker.kinds import hls
from ffworker.kinds.base import PlanError


@pytest.mark.parametrize("requested, source, keep, dropped", [
    ([360, 720], 1080, [360, 720], []),
    ([360, 720, 1080], 720, [360, 720], [1080]),
    ([720, 360, 360], 720, [360, 720], []),
    ([720, 1080], 480, [480], [720, 1080]),   # never upscale, keep one at the source's height
    ([1080], 721, [720], [1080]),
])
def test_ladder_never_upscales_and_keeps_at_least_one(requested, source, keep, dropped):
    assert hls.ladder(requested, source) == (keep, dropped)


def test_ladder_args_encode_every_rendition_in_one_run():
    args = hls.ladder_args(Path("/m/in.mp4"), Path("/m/.ffwtmp.j.1.out"), [360, 720], has_audio=True, segment_s=4)
    assert args[args.index("-format_whitelist") + 1].startswith("mov,")
    assert args[args.index("-filter_complex") + 1] == (
        "[0:v:0]split=2[s0][s1];[s0]scale=w=trunc(oh*dar/2)*2:h=360,setsar=1[v0];"
        "[s1]scale=w=trunc(oh*dar/2)*2:h=720,setsar=1[v1]")
    maps = [args[i + 1] for i, a in enumerate(args) if a == "-map"]
    assert maps == ["[v0]", "0:a:0", "[v1]", "0:a:0"]
    assert args[args.index("-var_stream_map") + 1] == "v:0,a:0,name:360p v:1,a:1,name:720p"
    assert args[args.index("-maxrate:v:0") + 1] == "900k" and args[args.index("-maxrate:v:1") + 1] == "3000k"
    assert args[args.index("-force_key_frames") + 1] == "expr:gte(t,n_forced*4)"
    assert args[args.index("-hls_time") + 1] == "4"
    assert args[args.index("-master_pl_name") + 1] == "master.m3u8"
    assert args[args.index("-hls_segment_filename") + 1] == "/m/.ffwtmp.j.1.out/%v_%05d.ts"
    assert args[-1] == "/m/.ffwtmp.j.1.out/%v.m3u8"


def test_ladder_args_without_audio():
    args = hls.ladder_args(Path("/m/in.mp4"), Path("/m/t"), [240], has_audio=False, segment_s=6)
    assert args[args.index("-filter_complex") + 1] == "[0:v:0]scale=w=trunc(oh*dar/2)*2:h=240,setsar=1[v0]"
    assert "-c:a" not in args and "0:a:0" not in args
    assert args[args.index("-var_stream_map") + 1] == "v:0,name:240p"


FFMPEG_MASTER = """#EXTM3U
#EXT-X-VERSION:6
#EXT-X-STREAM-INF:BANDWIDTH=140800,RESOLUTION=426x240,CODECS="avc1.640015,mp4a.40.2"
240p.m3u8

#EXT-X-STREAM-INF:BANDWIDTH=140800,RESOLUTION=640x360,CODECS="avc1.64001e,mp4a.40.2"
360p.m3u8
"""


def media_playlist(name: str, durations: list[float]) -> str:
    lines = ["#EXTM3U", "#EXT-X-VERSION:6", "#EXT-X-TARGETDURATION:2", "#EXT-X-PLAYLIST-TYPE:VOD"]
    for i, duration in enumerate(durations):
        lines += [f"#EXTINF:{duration:.6f},", f"{name}_{i:05d}.ts"]
    return "\n".join(lines + ["#EXT-X-ENDLIST"]) + "\n"


def test_parse_master_and_media_playlists():
    version, variants = hls.parse_master(FFMPEG_MASTER)
    assert version == 6
    assert variants["360p.m3u8"] == {"BANDWIDTH": "140800", "RESOLUTION": "640x360", "CODECS": "avc1.64001e,mp4a.40.2"}
    assert hls.parse_media_playlist(media_playlist("240p", [2.0, 0.5])) == [(2.0, "240p_00000.ts"),
                                                                           (0.5, "240p_00001.ts")]


def test_master_is_rewritten_with_measured_bandwidths(tmp_path):
    (tmp_path / "master.m3u8").write_text(FFMPEG_MASTER)
    for name, sizes in (("240p", [50_000, 10_000]), ("360p", [100_000, 20_000])):
        (tmp_path / f"{name}.m3u8").write_text(media_playlist(name, [2.0, 0.5]))
        for i, size in enumerate(sizes):
            (tmp_path / f"{name}_{i:05d}.ts").write_bytes(b"\0" * size)
    playlists = hls.write_master(tmp_path, [240, 360], frame_rate=25.0)
    master = (tmp_path / "master.m3u8").read_text().splitlines()
    assert master[:3] == ["#EXTM3U", "#EXT-X-VERSION:6", "#EXT-X-INDEPENDENT-SEGMENTS"]
    # 240p: 50 kB over 2 s (200 kbit/s) and 10 kB over 0.5 s (160 kbit/s): peak 200000, average 192000
    assert master[3] == ('#EXT-X-STREAM-INF:BANDWIDTH=200000,AVERAGE-BANDWIDTH=192000,RESOLUTION=426x240,'
                         'FRAME-RATE=25.000,CODECS="avc1.640015,mp4a.40.2"')
    assert master[4] == "240p.m3u8" and master[6] == "360p.m3u8"
    assert playlists[1]["bandwidth"] == 400000 and playlists[1]["width"] == 640 and playlists[1]["segments"] == 2


def test_a_rendition_missing_from_ffmpegs_master_is_an_error(tmp_path):
    (tmp_path / "master.m3u8").write_text("#EXTM3U\n")
    (tmp_path / "240p.m3u8").write_text(media_playlist("240p", [1.0]))
    (tmp_path / "240p_00000.ts").write_bytes(b"x")
    with pytest.raises(PlanError) as raised:
        hls.write_master(tmp_path, [240], frame_rate=None)
    assert raised.value.code == "ffmpeg_failed"


def test_check_of_output_dir(tmp_path):
    (tmp_path / "in.mp4").write_bytes(b"x")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "master.m3u8").write_text("#EXTM3U\n")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "in.mp4").write_bytes(b"x")
    spec = {"input": "in.mp4", "output_dir": "new"}
    assert hls.check(tmp_path, spec) == {}
    assert "already exists" in hls.check(tmp_path, {**spec, "output_dir": "old"})["output_dir"][0]
    assert hls.check(tmp_path, {**spec, "output_dir": "old", "overwrite": True}) == {}
    assert "holds no master.m3u8" in hls.check(
        tmp_path, {**spec, "output_dir": "photos", "overwrite": True})["output_dir"][0]
    inside = hls.check(tmp_path, {"input": "photos/in.mp4", "output_dir": "photos", "overwrite": True})
    assert "the input must not be inside output_dir" in inside["output_dir"]
    assert hls.check(tmp_path, {**spec, "output_dir": "../x"})["output_dir"]
    assert hls.check(tmp_path, {**spec, "output_dir": "in.mp4"})["output_dir"]


def test_temp_directory_name_is_recognised_by_orphan_cleanup(tmp_path):
    temp = paths.temp_path_for(tmp_path / "ladder", "0b7e9c1e-5b1f-4f53-8a9e-2f1d1c1b1a19", 2)
    assert paths.parse_temp_name(temp.name) == ("0b7e9c1e-5b1f-4f53-8a9e-2f1d1c1b1a19", 2)


def test_measure_refuses_an_empty_rendition(tmp_path):
    (tmp_path / "240p.m3u8").write_text("#EXTM3U\n#EXT-X-ENDLIST\n")
    with pytest.raises(PlanError):
        hls.measure(tmp_path, "240p.m3u8")


def test_codecs_fall_back_to_the_probed_profile_and_level(tmp_path, monkeypatch):
    (tmp_path / "master.m3u8").write_text('#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=1,RESOLUTION=640x360\n360p.m3u8\n')
    (tmp_path / "360p.m3u8").write_text(media_playlist("360p", [1.0]))
    (tmp_path / "360p_00000.ts").write_bytes(b"\0" * 1000)
    probed = {"streams": [{"codec_type": "video", "codec_name": "h264", "profile": "High", "level": 30},
                          {"codec_type": "audio", "codec_name": "aac", "profile": "LC"}]}
    monkeypatch.setattr(hls.process, "ffprobe", lambda *a, **k: probed)
    (playlist,) = hls.write_master(tmp_path, [360], frame_rate=None)
    assert playlist["codecs"] == "avc1.64001E,mp4a.40.2"
    assert 'CODECS="avc1.64001E,mp4a.40.2"' in (tmp_path / "master.m3u8").read_text()
