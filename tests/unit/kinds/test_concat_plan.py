"""concat planning from hand-written ffprobe output: compatibility, the list file, the re-encode graph."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest

from ffworker.kinds import concat
from ffworker.kinds.base import PlanError
from ffworker.kinds.concat import Clip, Target


def video(**overrides) -> dict:
    stream = {"index": 0, "codec_type": "video", "codec_name": "h264", "profile": "High", "width": 1280,
              "height": 720, "pix_fmt": "yuv420p", "sample_aspect_ratio": "1:1", "r_frame_rate": "25/1",
              "avg_frame_rate": "25/1", "time_base": "1/12800", "duration": "10.000000", "start_time": "0.000000",
              "extradata_hash": "SHA256:v1"}
    return {**stream, **overrides}


def audio(**overrides) -> dict:
    stream = {"index": 1, "codec_type": "audio", "codec_name": "aac", "profile": "LC", "sample_rate": "48000",
              "channels": 2, "channel_layout": "stereo", "duration": "10.000000", "start_time": "0.000000",
              "extradata_hash": "SHA256:a1"}
    return {**stream, **overrides}


def clip(number: int = 1, *, v: dict | None = None, a: dict | None = None, no_video=False, no_audio=False,
         duration: str = "10.000000") -> Clip:
    streams = ([] if no_video else [v or video()]) + ([] if no_audio else [a or audio()])
    probe = {"streams": streams, "format": {"duration": duration}}
    return concat.clip_from_probe(number, f"clip{number}.mp4", Path(f"/media/acme/clip{number}.mp4"), probe)


def clips(*variants: dict) -> list[Clip]:
    return [clip(i + 1, **variant) for i, variant in enumerate(variants)]


# -- mode -------------------------------------------------------------------------------


def test_identical_inputs_are_stream_copied_in_auto_mode():
    mode, reason = concat.choose_mode({}, clips({}, {}, {}), "mp4")
    assert mode == "copy"
    assert "same codecs" in reason


@pytest.mark.parametrize("changes, words", [
    ({"v": video(width=640)}, "width 640 (input 1: 1280)"),
    ({"v": video(height=360)}, "height 360"),
    ({"v": video(codec_name="hevc")}, "video codec hevc"),
    ({"v": video(profile="Main")}, "video profile Main"),
    ({"v": video(pix_fmt="yuv420p10le")}, "pixel format yuv420p10le"),
    ({"v": video(r_frame_rate="30/1")}, "frame rate 30/1"),
    ({"v": video(time_base="1/90000")}, "video time base 1/90000"),
    ({"v": video(sample_aspect_ratio="4:3")}, "sample aspect ratio 4/3"),
    ({"v": video(side_data_list=[{"rotation": -90}])}, "rotation 270"),
    ({"v": video(extradata_hash="SHA256:v2")}, "video codec parameters (SPS/PPS)"),
    ({"a": audio(codec_name="mp3")}, "audio codec mp3"),
    ({"a": audio(sample_rate="44100")}, "sample rate 44100"),
    ({"a": audio(channels=1, channel_layout="mono")}, "channels 1"),
    ({"no_audio": True}, "audio track absent (input 1: present)"),
])
def test_any_difference_makes_auto_reencode_and_is_named(changes, words):
    mode, reason = concat.choose_mode({}, clips({}, changes), "mp4")
    assert mode == "reencode"
    assert words in reason and "input 2 ('clip2.mp4')" in reason


def test_details_of_a_missing_track_are_not_listed_as_differences():
    _, reason = concat.choose_mode({}, clips({}, {"no_audio": True}), "mp4")
    assert "audio codec" not in reason and "sample rate" not in reason


def test_copy_mode_on_incompatible_inputs_is_a_plan_error_naming_what_differs():
    with pytest.raises(PlanError) as raised:
        concat.choose_mode({"mode": "copy"}, clips({}, {"v": video(width=640)}), "mp4")
    assert raised.value.code == "incompatible_inputs"
    assert "width 640 (input 1: 1280)" in str(raised.value) and "reencode" in str(raised.value)


def test_copy_mode_on_compatible_inputs_copies():
    assert concat.choose_mode({"mode": "copy"}, clips({}, {}), "mp4")[0] == "copy"


def test_reencode_mode_always_reencodes():
    assert concat.choose_mode({"mode": "reencode"}, clips({}, {}), "mp4") == ("reencode", "re-encoding was requested")


def test_a_container_that_cannot_hold_the_codecs_forces_reencode():
    mode, reason = concat.choose_mode({}, clips({}, {}), "webm")
    assert mode == "reencode" and "webm cannot hold h264 video" in reason and "aac audio" in reason


def test_a_requested_size_unlike_the_inputs_forces_reencode_in_auto_mode():
    assert concat.choose_mode({"height": 720}, clips({}, {}), "mp4")[0] == "copy"
    mode, reason = concat.choose_mode({"height": 480}, clips({}, {}), "mp4")
    assert mode == "reencode" and "requested height 480" in reason


def test_many_differing_inputs_are_summarised():
    _, reason = concat.choose_mode({}, clips({}, *[{"v": video(width=640 + 2 * i)} for i in range(6)]), "mp4")
    assert "and 3 more inputs differ" in reason


def test_cover_art_is_not_video():
    cover = video(disposition={"attached_pic": 1}, codec_name="mjpeg")
    probe = {"streams": [audio(index=0), {**cover, "index": 1}], "format": {"duration": "3.0"}}
    assert concat.clip_from_probe(1, "a.m4a", Path("/m/a.m4a"), probe).video is None


def test_an_input_of_unknown_duration_is_invalid_input():
    probe = {"streams": [video(duration=None)], "format": {}}
    with pytest.raises(PlanError) as raised:
        concat.clip_from_probe(2, "x.mp4", Path("/m/x.mp4"), probe)
    assert raised.value.code == "invalid_input" and "input 2" in str(raised.value)


# -- the list file -------------------------------------------------------------------------


def test_list_file_quotes_every_path_absolutely():
    names = ["/media/acme/plain.mp4", "/media/acme/with space.mp4", "/media/acme/it's.mp4",
             "/media/acme/über'n'ümlaut.mp4", "/media/acme/back\\slash.mp4"]
    listing = concat.concat_list([Clip(i, "x", Path(n), 1, None, None, ()) for i, n in enumerate(names)])
    lines = listing.decode("utf-8").splitlines()
    assert lines[0] == "ffconcat version 1.0"
    assert lines[1:] == ["file '/media/acme/plain.mp4'", "file '/media/acme/with space.mp4'",
                         "file '/media/acme/it'\\''s.mp4'", "file '/media/acme/über'\\''n'\\''ümlaut.mp4'",
                         "file '/media/acme/back\\slash.mp4'"]


def test_list_file_refuses_a_control_character():
    with pytest.raises(PlanError) as raised:
        concat.concat_list([Clip(1, "x.mp4", Path("/media/acme/a\nfile '/etc/passwd"), 1, None, None, ())])
    assert raised.value.code == "invalid_input" and "/etc" not in str(raised.value)


def test_copy_args_use_the_list_with_only_local_media_files():
    listing, temp = Path("/m/.ffwtmp.j.1.out.mp4.ffconcat"), Path("/m/.ffwtmp.j.1.out.mp4")
    args = concat.copy_args(listing, clips({}, {}), "mp4", temp)
    assert args[:4] == ["-f", "concat", "-safe", "0"]
    assert args[args.index("-protocol_whitelist") + 1] == "file"
    assert args[args.index("-format_whitelist") + 1].startswith("concat,mov,")
    assert "hls" not in args[args.index("-format_whitelist") + 1].split(",")
    assert args[-6:] == ["-movflags", "+faststart", "-f", "mp4", "-y", "/m/.ffwtmp.j.1.out.mp4"]
    assert ["-c", "copy"] == args[args.index("-c"):args.index("-c") + 2]


# -- re-encoding -------------------------------------------------------------------------------


def test_target_is_the_first_inputs_display_size_frame_rate_and_audio_format():
    goal = concat.reencode_target({}, clips({"v": video(width=1920, height=1080, r_frame_rate="30000/1001")},
                                            {"v": video(width=640, height=360)}), "mp4")
    assert (goal.width, goal.height, goal.fps) == (1920, 1080, Fraction(30000, 1001))
    assert (goal.sample_rate, goal.channel_layout) == (48000, "stereo")


def test_target_follows_rotation_and_non_square_pixels():
    rotated = concat.reencode_target({}, clips({"v": video(side_data_list=[{"rotation": 90}])}, {}), "mp4")
    assert (rotated.width, rotated.height) == (720, 1280)
    anamorphic = concat.reencode_target({}, clips({"v": video(width=720, height=576, sample_aspect_ratio="16:15")},
                                                  {}), "mp4")
    assert (anamorphic.width, anamorphic.height) == (768, 576)


def test_a_requested_height_keeps_the_first_inputs_aspect_ratio():
    goal = concat.reencode_target({"height": 480, "fps": 29.97}, clips({}, {}), "mp4")
    assert (goal.width, goal.height, goal.fps) == (854, 480, Fraction(30000, 1001))


def test_opus_containers_get_48_khz():
    goal = concat.reencode_target({}, clips({"a": audio(sample_rate="44100")}, {}), "webm")
    assert goal.sample_rate == 48000


def test_segment_lengths_round_on_the_running_total():
    # 30 inputs of 1.01 s at 25 fps: rounding each alone would add 0.25 frame per input.
    inputs = [clip(i, v=video(duration="1.010000"), a=audio(duration="1.010000")) for i in range(1, 31)]
    target = Target(1280, 720, Fraction(25), 48000, "stereo")
    lengths = concat.segment_lengths(inputs, target)
    frames = sum(f for f, _ in lengths)
    samples = sum(s for _, s in lengths)
    assert abs(frames / 25 - 30 * 1.01) <= 0.5 / 25
    assert samples == frames * 48000 // 25  # audio ends exactly with the video
    for f, s in lengths:  # and every segment's audio is as long as its video, to the sample
        assert abs(s / 48000 - f / 25) < 1 / 25


def test_reencode_graph_normalises_every_input_and_fills_missing_audio_with_silence():
    inputs = clips({}, {"v": video(width=640, height=480), "a": audio(sample_rate="44100", channels=1,
                                                                       channel_layout="mono")},
                   {"no_audio": True, "duration": "4.000000", "v": video(duration="4.000000")})
    graph, duration = concat.reencode_graph(inputs, concat.reencode_target({}, inputs, "mp4"))
    chains = graph.split(";")
    assert duration == pytest.approx(24.0)
    assert chains[0].startswith(
        "[0:v:0]setpts=PTS-(0.000000)/TB,scale=w=1280:h=720:force_original_aspect_ratio=decrease")
    assert "pad=1280:720:(ow-iw)/2:(oh-ih)/2" in chains[2] and "fps=fps=25:start_time=0" in chains[2]
    assert "trim=end_frame=250" in chains[0]
    assert chains[3].startswith("[1:a:0]") and "aresample=osr=48000" in chains[3]
    assert "channel_layouts=stereo" in chains[3]
    assert chains[3].endswith("atrim=end_sample=480000,asetpts=PTS-STARTPTS[a1]")
    assert chains[5].startswith("anullsrc=r=48000:cl=stereo") and "atrim=end_sample=192000" in chains[5]
    assert chains[-1] == "[v0][a0][v1][a1][v2][a2]concat=n=3:v=1:a=1[v][a]"


def test_reencode_of_audio_only_inputs_has_no_video_chain():
    inputs = clips({"no_video": True}, {"no_video": True, "a": audio(duration="5.0")})
    graph, duration = concat.reencode_graph(inputs, concat.reencode_target({}, inputs, "m4a"))
    assert "[0:v" not in graph and graph.endswith("concat=n=2:v=0:a=1[a]")
    assert duration == pytest.approx(15.0)


def test_reencode_args_pick_encoders_from_the_container():
    inputs = clips({}, {})
    mp4, _ = concat.reencode_args({"crf": 18, "preset": "slow"}, inputs, concat.reencode_target({}, inputs, "mp4"),
                                  "mp4", Path("/m/.ffwtmp.j.1.o.mp4"))
    assert mp4.count("-format_whitelist") == 2 and mp4.count("-i") == 2
    assert mp4[mp4.index("-c:v") + 1] == "libx264" and mp4[mp4.index("-crf") + 1] == "18"
    assert mp4[mp4.index("-preset") + 1] == "slow" and mp4[mp4.index("-c:a") + 1] == "aac"
    webm, _ = concat.reencode_args({}, inputs, concat.reencode_target({}, inputs, "webm"), "webm", Path("/m/o.webm"))
    assert webm[webm.index("-c:v") + 1] == "libvpx-vp9" and webm[webm.index("-c:a") + 1] == "libopus"
    assert "-movflags" not in webm


def test_an_audio_only_output_compares_only_the_audio():
    assert concat.choose_mode({}, clips({}, {"v": video(width=640)}), "m4a")[0] == "copy"
    mode, reason = concat.choose_mode({}, clips({}, {"a": audio(sample_rate="44100")}), "m4a")
    assert mode == "reencode" and "sample rate 44100" in reason


def test_an_audio_only_merge_follows_the_audio_timeline():
    inputs = clips({"a": audio(duration="3.000000", start_time="0.500000"), "v": video(duration="2.0")}, {})
    graph, duration = concat.reencode_graph(inputs, concat.reencode_target({}, inputs, "m4a"))
    assert duration == pytest.approx(13.0)
    assert graph.startswith("[0:a:0]asetpts=PTS-(0.500000)/TB,") and "atrim=end_sample=144000," in graph
