"""Stream geometry from ffprobe's JSON: the picture as it is shown, the frame rate, the main streams."""
from __future__ import annotations

from fractions import Fraction

from ffworker import media


def test_display_size_applies_non_square_pixels_and_rotation_and_stays_even():
    assert media.display_size({"width": 1280, "height": 720}) == (1280, 720)
    assert media.display_size({"width": 720, "height": 576, "sample_aspect_ratio": "16:15"}) == (768, 576)
    assert media.display_size({"width": 1280, "height": 720, "side_data_list": [{"rotation": -90}]}) == (720, 1280)
    assert media.display_size({"width": 641, "height": 361}) == (640, 360)


def test_rotation_reads_the_display_matrix_before_the_legacy_tag():
    assert media.rotation({"tags": {"rotate": "180"}}) == 180
    assert media.rotation({"side_data_list": [{"rotation": 90}], "tags": {"rotate": "180"}}) == 90
    assert media.rotation({"tags": {"rotate": "sideways"}}) == 0


def test_unusable_sample_aspect_ratios_count_as_square():
    for value in (None, "0:1", "1:0", "n/a"):
        assert media.sample_aspect_ratio({"sample_aspect_ratio": value}) == 1


def test_frame_rate_prefers_a_sane_base_rate_then_the_average():
    assert media.frame_rate({"r_frame_rate": "30000/1001", "avg_frame_rate": "25/1"}) == Fraction(30000, 1001)
    assert media.frame_rate({"r_frame_rate": "90000/1", "avg_frame_rate": "25/1"}) == 25
    assert media.frame_rate({"r_frame_rate": "0/0", "avg_frame_rate": "0/0"}) is None


def test_cover_art_is_not_the_main_video_stream():
    cover = {"codec_type": "video", "disposition": {"attached_pic": 1}}
    audio = {"codec_type": "audio"}
    assert media.main_stream({"streams": [cover, audio]}, "video") is None
    assert media.main_stream({"streams": [cover, audio]}, "audio") is audio
    assert media.first_stream({"streams": [cover, audio]}, "video") is cover
