"""ffmpeg argument plans for transcode jobs, from hand-written ffprobe output; the multi-field rules."""
from __future__ import annotations

from pathlib import Path

import pytest

from ffworker.kinds.base import PlanError
from ffworker.kinds.transcode import PRESETS, plan_transcode, transcode_rule_errors
from tests.helpers import ffprobe_output as probe, option

SOURCE = Path("/media/acme/in.mp4")


def options(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, arg in enumerate(args) if arg == flag]


def transcode(spec: dict, media: dict | None = None, target: str = "/media/acme/.ffwtmp.j.1.out.mp4"):
    return plan_transcode(spec, SOURCE, probe() if media is None else media, Path(target))


# -- transcode ----------------------------------------------------------------------


def test_h264_360p_preset():
    plan = transcode({"input": "in.mp4", "output": "out.mp4", "preset": "h264-360p"})
    args = plan.args
    assert option(args, "-i") == str(SOURCE)
    assert options(args, "-map") == ["0:v:0?", "0:a:0?"]
    assert option(args, "-c:v") == "libx264"
    assert option(args, "-vf") == "scale=-2:360"
    assert option(args, "-pix_fmt") == "yuv420p"
    assert option(args, "-crf") == "23"
    assert option(args, "-preset") == "veryfast"
    assert option(args, "-c:a") == "aac"
    assert option(args, "-b:a") == "96k"
    assert option(args, "-movflags") == "+faststart"
    assert option(args, "-f") == "mp4"
    assert args[-2:] == ["-y", "/media/acme/.ffwtmp.j.1.out.mp4"]
    assert args.index("-i") < args.index("-map") < args.index("-c:v")
    assert "-vn" not in args and "-an" not in args
    assert all(isinstance(arg, str) for arg in args)
    assert plan.duration_s == 12.5


@pytest.mark.parametrize("preset,height,crf,bitrate", [
    ("h264-480p", 480, "23", "128k"), ("h264-720p", 720, "22", "128k"), ("h264-1080p", 1080, "22", "160k"),
])
def test_other_h264_presets(preset, height, crf, bitrate):
    args = transcode({"input": "in.mp4", "output": "out.mp4", "preset": preset}).args
    assert option(args, "-vf") == f"scale=-2:{height}"
    assert option(args, "-crf") == crf and option(args, "-b:a") == bitrate


def test_audio_aac_preset_drops_video():
    args = transcode({"input": "in.mp4", "output": "out.m4a", "preset": "audio-aac"},
                     target="/media/acme/out.m4a").args
    assert "-vn" in args
    assert "-c:v" not in args and "-vf" not in args and "-crf" not in args
    assert option(args, "-c:a") == "aac" and option(args, "-b:a") == "128k"
    assert option(args, "-f") == "ipod" and option(args, "-movflags") == "+faststart"


def test_audio_aac_preset_works_on_audio_only_input():
    plan = transcode({"input": "in.mp4", "output": "out.m4a", "preset": "audio-aac"}, probe(video=False))
    assert "-vn" in plan.args


def test_webm_uses_vp9_and_opus_without_faststart():
    spec = {"input": "in.mp4", "output": "out.webm", "video": {"codec": "vp9", "crf": 33, "quality": "480p"},
            "audio": {"codec": "opus", "bitrate": "96k"}}
    args = transcode(spec, target="/media/acme/out.webm").args
    assert option(args, "-c:v") == "libvpx-vp9"
    assert option(args, "-b:v") == "0"  # constant quality: crf with a zero target bitrate
    assert option(args, "-crf") == "33"
    assert option(args, "-vf") == "scale=-2:480"
    assert option(args, "-c:a") == "libopus" and option(args, "-b:a") == "96k"
    assert option(args, "-f") == "webm"
    assert "-movflags" not in args and "-preset" not in args


def test_explicit_h264_settings():
    spec = {"input": "in.mp4", "output": "out.mkv",
            "video": {"codec": "h264", "crf": 18, "preset": "slow", "height": 540, "fps": 24.0},
            "audio": {"codec": "mp3", "bitrate": "192k"}}
    args = transcode(spec, target="/media/acme/out.mkv").args
    assert option(args, "-c:v") == "libx264" and option(args, "-preset") == "slow" and option(args, "-crf") == "18"
    assert option(args, "-vf") == "scale=-2:540,fps=24.0"
    assert option(args, "-c:a") == "libmp3lame" and option(args, "-b:a") == "192k"
    assert option(args, "-f") == "matroska" and "-movflags" not in args


def test_hevc_gets_an_x26x_preset():
    args = transcode({"input": "in.mp4", "output": "out.mp4", "video": {"codec": "hevc"}, "audio": {"codec": "aac"}}).args
    assert option(args, "-c:v") == "libx265" and option(args, "-preset") == "veryfast"


def test_without_a_height_dimensions_are_only_made_even():
    args = transcode({"input": "in.mp4", "output": "out.mp4", "video": {"codec": "h264"}, "audio": {"codec": "aac"}}).args
    assert option(args, "-vf") == "scale=trunc(iw/2)*2:trunc(ih/2)*2"
    assert "-crf" not in args


def test_quality_maps_to_a_height():
    args = transcode({"input": "in.mp4", "output": "out.mp4", "video": {"codec": "h264", "quality": "720p"},
                      "audio": {"codec": "aac"}}).args
    assert option(args, "-vf") == "scale=-2:720"


def test_stream_copy_and_no_audio():
    args = transcode({"input": "in.mp4", "output": "out.mp4", "video": {"codec": "copy"},
                      "audio": {"codec": "none"}}).args
    assert option(args, "-c:v") == "copy"
    assert "-vf" not in args and "-pix_fmt" not in args
    assert "-an" in args and "-c:a" not in args


def test_audio_copy_ignores_a_bitrate():
    args = transcode({"input": "in.mp4", "output": "out.mp4", "video": {"codec": "h264"},
                      "audio": {"codec": "copy", "bitrate": "128k"}}).args
    assert option(args, "-c:a") == "copy" and "-b:a" not in args


def test_default_codecs_for_mp4():
    args = transcode({"input": "in.mp4", "output": "out.mp4"}).args
    assert option(args, "-c:v") == "libx264" and option(args, "-c:a") == "aac"


def test_container_field_overrides_the_suffix():
    args = transcode({"input": "in.mp4", "output": "out.bin.mp4", "container": "mkv", "preset": "h264-360p"}).args
    assert option(args, "-f") == "matroska" and "-movflags" not in args


def test_an_input_without_streams_is_invalid_input():
    for media in (probe(video=False, audio=False), {"streams": [], "format": {}}, {}):
        with pytest.raises(PlanError) as info:
            transcode({"input": "in.mp4", "output": "out.mp4", "preset": "h264-360p"}, media)
        assert info.value.code == "invalid_input"


def test_an_input_with_only_a_data_stream_is_invalid_input():
    media = {"streams": [{"index": 0, "codec_type": "data", "codec_name": "bin_data"}], "format": {"duration": "3"}}
    with pytest.raises(PlanError) as info:
        transcode({"input": "in.mp4", "output": "out.m4a", "preset": "audio-aac"}, media)
    assert info.value.code == "invalid_input"


def test_duration_falls_back_to_the_longest_stream():
    media = probe(duration=None, stream_duration="7.25")
    assert transcode({"input": "in.mp4", "output": "out.mp4", "preset": "h264-360p"}, media).duration_s == 7.25
    assert transcode({"input": "in.mp4", "output": "out.mp4", "preset": "h264-360p"},
                     probe(duration="N/A")).duration_s is None


# -- thumbnail ------------------------------------------------------------------------------


# -- transcode_rule_errors --------------------------------------------------------------------


@pytest.mark.parametrize("spec", [
    {"output": "o.mp4", "preset": "h264-720p"},
    {"output": "o.m4a", "preset": "audio-aac"},
    {"output": "o.mp4", "preset": "audio-aac"},
    {"output": "o.mkv", "video": {"codec": "vp9"}, "audio": {"codec": "mp3"}},
    {"output": "o.webm", "video": {"codec": "av1"}, "audio": {"codec": "none"}},
    {"output": "o.webm", "video": {"codec": "vp9"}},
    {"output": "o.mov", "video": {"codec": "hevc"}, "audio": {"codec": "aac"}},
    {"output": "o.ogg"},
    {"output": "o.m4a"},
    {"output": "O.MP4"},
    {"output": "o.webm", "container": "mkv", "video": {"codec": "h264"}, "audio": {"codec": "aac"}},
], ids=repr)
def test_valid_combinations_have_no_rule_errors(spec):
    assert transcode_rule_errors(spec) == {}


@pytest.mark.parametrize("spec,field,words", [
    ({"output": "o.avi"}, "container", "avi"),
    ({"output": "noextension"}, "container", "unsupported"),
    ({"output": "o.mp4", "container": "flv"}, "container", "flv"),
    ({"output": "o.mp4", "preset": "h264-360p", "video": {"codec": "h264"}}, "preset", "not both"),
    ({"output": "o.mp4", "preset": "h264-360p", "audio": {"codec": "aac"}}, "preset", "not both"),
    ({"output": "o.webm", "video": {"codec": "h264"}}, "video", "h264"),
    ({"output": "o.webm", "video": {"codec": "vp9"}, "audio": {"codec": "aac"}}, "audio", "aac"),
    ({"output": "o.mov", "video": {"codec": "av1"}}, "video", "av1"),
    ({"output": "o.mp4", "video": {"codec": "vp9"}}, "video", "vp9"),
    ({"output": "o.m4a", "preset": "h264-360p"}, "video", "no video"),
    ({"output": "o.mp3", "video": {"codec": "h264"}, "audio": {"codec": "mp3"}}, "video", "no video"),
    ({"output": "o.ogg", "audio": {"codec": "aac"}}, "audio", "aac"),
    ({"output": "o.mp4", "video": {"codec": "h264"}, "audio": {"codec": "opus"}, "container": "mov"}, "audio", "opus"),
], ids=repr)
def test_rule_errors_name_the_field(spec, field, words):
    errors = transcode_rule_errors(spec)
    assert field in errors, errors
    assert words in errors[field]


def test_both_codec_errors_are_reported_together():
    errors = transcode_rule_errors({"output": "o.webm", "video": {"codec": "hevc"}, "audio": {"codec": "mp3"}})
    assert set(errors) == {"video", "audio"}


def test_webm_without_explicit_codecs_defaults_to_vp9_and_opus():
    spec = {"output": "o.webm"}
    assert transcode_rule_errors(spec) == {}
    args = transcode({"input": "in.mp4", **spec}, target="/media/acme/o.webm").args
    assert option(args, "-c:v") == "libvpx-vp9" and option(args, "-c:a") == "libopus"


def test_mp3_without_explicit_codecs_defaults_to_mp3_audio():
    spec = {"output": "o.mp3"}
    assert transcode_rule_errors(spec) == {}
    args = transcode({"input": "in.mp4", **spec}, target="/media/acme/o.mp3").args
    assert option(args, "-c:a") == "libmp3lame" and "-vn" in args


def test_every_preset_is_valid_for_its_natural_container():
    for name, preset in PRESETS.items():
        output = "o.mp4" if preset["video"] else "o.m4a"
        assert transcode_rule_errors({"output": output, "preset": name}) == {}, name
