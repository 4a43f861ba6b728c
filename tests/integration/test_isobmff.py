"""An MP4/MOV output described from its header equals what ffprobe says of it, field for
field, for every video and audio codec the transcode presets and a stream copy write into
mp4, mov and m4a; anything else is left to ffprobe (``isobmff.probe`` gives None).

Real ffmpeg writes the files; real ffprobe is the reference.
"""
from __future__ import annotations

import subprocess

import pytest

from ffworker import isobmff, media, process
from ffworker.kinds.base import INPUT_FORMATS

pytestmark = pytest.mark.integration

SOURCES = ["-f", "lavfi", "-i", "testsrc2=size=322x240:rate=25", "-f", "lavfi", "-i",
           "sine=frequency=440:sample_rate=44100"]


def write(path, *args, seconds="1.3"):
    subprocess.run(["ffmpeg", "-v", "error", "-y", *SOURCES, "-t", seconds, *args, str(path)], check=True)
    return path


def ffprobe_summary(path):
    return media.output_summary("x", process.ffprobe(str(path), formats=INPUT_FORMATS), path.stat().st_size)


def header_summary(path):
    probe = isobmff.probe(path)
    return None if probe is None else media.output_summary("x", probe, path.stat().st_size)


CASES = {
    "h264 aac mp4 faststart": ("a.mp4", ["-vf", "scale=-2:120", "-c:v", "libx264", "-preset", "ultrafast",
                                         "-c:a", "aac", "-b:a", "96k", "-movflags", "+faststart"]),
    "h264 aac mp4 moov last": ("b.mp4", ["-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac"]),
    "h264 aac mov (esds in wave)": ("c.mov", ["-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac",
                                              "-f", "mov"]),
    "hevc opus mp4": ("d.mp4", ["-c:v", "libx265", "-preset", "ultrafast", "-x265-params", "log-level=error",
                                "-c:a", "libopus"]),
    "h264 mp3 mp4": ("e.mp4", ["-c:v", "libx264", "-preset", "ultrafast", "-c:a", "libmp3lame"]),
    "h264 mp3 mov": ("f.mov", ["-c:v", "libx264", "-preset", "ultrafast", "-c:a", "libmp3lame"]),
    "video only": ("g.mp4", ["-an", "-c:v", "libx264", "-preset", "ultrafast"]),
    "audio only m4a": ("h.m4a", ["-vn", "-c:a", "aac", "-f", "ipod"]),
    "anamorphic, 48 kHz, NTSC rate": ("i.mp4", ["-vf", "setsar=4/3", "-r", "30000/1001", "-ar", "48000",
                                                "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac"]),
    "vp9 opus mp4": ("j.mp4", ["-c:v", "libvpx-vp9", "-deadline", "realtime", "-c:a", "libopus"]),
}


@pytest.mark.parametrize("name", CASES)
def test_the_header_says_what_ffprobe_says(tmp_path, name):
    filename, args = CASES[name]
    path = write(tmp_path / filename, *args)

    described = header_summary(path)

    assert described is not None, "described by ffprobe instead"
    assert described == ffprobe_summary(path)


def test_a_stream_copy_and_a_long_file_are_described_exactly(tmp_path):
    source = write(tmp_path / "src.mkv", "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac", seconds="61.7")
    copied = tmp_path / "copy.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(source), "-c", "copy", "-movflags", "+faststart",
                    str(copied)], check=True)

    assert header_summary(copied) == ffprobe_summary(copied)


@pytest.mark.parametrize("filename, args", [
    ("fragmented.mp4", ["-c:v", "libx264", "-preset", "ultrafast", "-movflags", "frag_keyframe+empty_moov"]),
    ("mpeg4.mp4", ["-c:v", "mpeg4", "-c:a", "aac"]),            # a codec the reader does not name
])
def test_what_the_reader_does_not_know_is_left_to_ffprobe(tmp_path, filename, args):
    path = write(tmp_path / filename, *args)

    assert isobmff.probe(path) is None


def test_a_track_that_is_neither_video_nor_audio_is_left_to_ffprobe(tmp_path):
    subtitles = tmp_path / "s.srt"
    subtitles.write_text("1\n00:00:00,000 --> 00:00:01,000\nhello\n")
    path = tmp_path / "subtitled.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-y", *SOURCES, "-i", str(subtitles), "-t", "1.3",
                    "-map", "0:v", "-map", "1:a", "-map", "2:s", "-c:v", "libx264", "-preset", "ultrafast",
                    "-c:a", "aac", "-c:s", "mov_text", str(path)], check=True)

    assert isobmff.probe(path) is None


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "no moov"])
def test_a_damaged_file_is_left_to_ffprobe(tmp_path, damage):
    good = write(tmp_path / "good.mp4", "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac",
                 "-movflags", "+faststart")
    data = good.read_bytes()
    broken = tmp_path / "broken.mp4"
    broken.write_bytes({
        "truncated": data[:600],
        "garbage": data[:40] + b"\xff" * 200 + data[240:],
        "empty": b"",
        "no moov": data[:8] + b"\x00\x00\x00\x08free",
    }[damage])

    assert isobmff.probe(broken) is None
