"""ffmpeg argument plans for thumbnail jobs, from hand-written ffprobe output."""
from __future__ import annotations

from pathlib import Path

import pytest

from ffworker.kinds.base import PlanError
from ffworker.kinds.thumbnail import plan_thumbnail
from tests.helpers import ffprobe_output as probe, option

SOURCE = Path("/media/acme/in.mp4")


def thumbnail(spec: dict, media: dict | None = None, target: str = "/media/acme/t.jpg"):
    return plan_thumbnail({"input": "in.mp4", "output": Path(target).name, **spec}, SOURCE,
                          probe() if media is None else media, Path(target))


def test_thumbnail_defaults_to_ten_percent_of_the_duration():
    plan = thumbnail({})
    assert plan.result == {"at_s": 1.25}
    assert option(plan.args, "-ss") == "1.250"
    assert args_order(plan.args, "-ss", "-i")  # seek before the input: fast, keyframe-accurate enough
    assert option(plan.args, "-frames:v") == "1"
    assert "-an" in plan.args
    assert plan.args[-1] == "/media/acme/t.jpg"
    assert plan.duration_s is None


def args_order(args, first, second) -> bool:
    return args.index(first) < args.index(second)


def test_thumbnail_default_uses_the_stream_duration_when_the_format_has_none():
    assert thumbnail({}, probe(duration=None, stream_duration="40")).result == {"at_s": 4.0}


def test_thumbnail_of_an_input_of_unknown_duration_takes_the_first_frame():
    plan = thumbnail({}, probe(duration=None))
    assert plan.result == {"at_s": 0.0} and option(plan.args, "-ss") == "0.000"


def test_thumbnail_at_an_explicit_time_and_width():
    plan = thumbnail({"at_s": 3.5, "width": 320})
    assert option(plan.args, "-ss") == "3.500"
    assert option(plan.args, "-vf") == "scale=320:-2"
    assert plan.result == {"at_s": 3.5}


def test_thumbnail_just_before_the_end_is_allowed():
    assert thumbnail({"at_s": 12.4}).result == {"at_s": 12.4}


@pytest.mark.parametrize("at_s", [12.5, 13, 1000])
def test_thumbnail_at_or_beyond_the_duration_is_a_plan_error(at_s):
    with pytest.raises(PlanError) as info:
        thumbnail({"at_s": at_s})
    assert info.value.code == "invalid_request"
    assert "12.500" in str(info.value)


def test_thumbnail_needs_a_video_stream():
    with pytest.raises(PlanError) as info:
        thumbnail({}, probe(video=False))
    assert info.value.code == "invalid_input"


@pytest.mark.parametrize("target,expected,absent", [
    ("/m/t.jpg", ["-q:v", "2"], "-c:v"),
    ("/m/t.JPEG", ["-q:v", "2"], "-c:v"),
    ("/m/t.webp", ["-c:v", "libwebp"], "-q:v"),
])
def test_thumbnail_encoder_follows_the_suffix(target, expected, absent):
    args = thumbnail({}, target=target).args
    assert option(args, expected[0]) == expected[1]
    assert absent not in args


def test_png_thumbnail_uses_the_default_encoder():
    args = thumbnail({}, target="/m/t.png").args
    assert "-q:v" not in args and "-c:v" not in args
