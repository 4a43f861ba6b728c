"""Plain summaries of ffprobe's JSON, for job results and planning, and the geometry of its streams."""
from __future__ import annotations

from fractions import Fraction
from typing import Any


def _number(value: Any, cast=float):
    try:
        result = cast(value)
    except (TypeError, ValueError):
        return None
    return result if result == result else None  # drop NaN


def _rate(value: Any) -> float | None:
    """ffprobe frame rates are fractions like '30000/1001'; '0/0' means unknown."""
    try:
        rate = Fraction(str(value))
    except (ValueError, ZeroDivisionError):
        return None
    return round(float(rate), 3) if rate > 0 else None


def stream_summary(stream: dict) -> dict:
    kind = stream.get("codec_type")
    summary = {
        "index": stream.get("index"),
        "type": kind,
        "codec": stream.get("codec_name"),
        "bit_rate": _number(stream.get("bit_rate"), int),
        "duration_s": _number(stream.get("duration")),
    }
    if kind == "video":
        summary.update(
            width=stream.get("width"), height=stream.get("height"),
            fps=_rate(stream.get("avg_frame_rate")) or _rate(stream.get("r_frame_rate")),
            pix_fmt=stream.get("pix_fmt"), profile=stream.get("profile"),
            time_base=stream.get("time_base"),
        )
    elif kind == "audio":
        summary.update(
            sample_rate=_number(stream.get("sample_rate"), int), channels=stream.get("channels"),
            channel_layout=stream.get("channel_layout"), sample_fmt=stream.get("sample_fmt"),
        )
    return summary


def summarize(probe: dict) -> dict:
    """``result.media`` of a probe job: duration, format and every stream."""
    fmt = probe.get("format", {})
    return {
        "duration_s": duration_of(probe),
        "format": fmt.get("format_name"),
        "size_bytes": _number(fmt.get("size"), int),
        "bit_rate": _number(fmt.get("bit_rate"), int),
        "streams": [stream_summary(s) for s in probe.get("streams", [])],
    }


def duration_of(probe: dict) -> float | None:
    duration = _number(probe.get("format", {}).get("duration"))
    if duration is None:
        durations = [_number(s.get("duration")) for s in probe.get("streams", [])]
        duration = max((d for d in durations if d), default=None)
    return duration if duration and duration > 0 else None


def first_stream(probe: dict, kind: str) -> dict | None:
    return next((s for s in probe.get("streams", []) if s.get("codec_type") == kind), None)


# -- stream geometry: the picture as it is shown (concat and hls size their outputs by it) --


def main_stream(probe: dict, kind: str) -> dict | None:
    """The first stream of that kind, cover art (an attached picture) not counting as video."""
    for stream in probe.get("streams", []):
        if stream.get("codec_type") == kind and not (stream.get("disposition") or {}).get("attached_pic"):
            return stream
    return None


def rotation(stream: dict) -> int:
    """Display rotation in degrees (0, 90, 180, 270) from the display matrix or the legacy tag."""
    value = None
    for side_data in stream.get("side_data_list") or []:
        if "rotation" in side_data:
            value = side_data["rotation"]
    if value is None:
        value = (stream.get("tags") or {}).get("rotate")
    try:
        return int(round(float(value or 0))) % 360
    except (TypeError, ValueError):
        return 0


def sample_aspect_ratio(stream: dict) -> Fraction:
    try:
        sar = Fraction(str(stream.get("sample_aspect_ratio") or "1:1").replace(":", "/"))
    except (ValueError, ZeroDivisionError):
        return Fraction(1)
    return sar if sar > 0 else Fraction(1)


def display_size(stream: dict) -> tuple[int, int]:
    """The size the picture is shown at: square pixels, rotation applied, even."""
    width = int(stream["width"] * sample_aspect_ratio(stream))
    height = int(stream["height"])
    if rotation(stream) in (90, 270):
        width, height = height, width
    return max(2, width - width % 2), max(2, height - height % 2)


def frame_rate(stream: dict) -> Fraction | None:
    """The stream's frame rate: its base rate when sane, else the average."""
    for key in ("r_frame_rate", "avg_frame_rate"):
        try:
            rate = Fraction(str(stream.get(key)))
        except (ValueError, ZeroDivisionError):
            continue
        if 1 <= rate <= 240:
            return rate
    return None


def output_summary(user_path: str, probe: dict, size_bytes: int) -> dict:
    """One entry of ``result.outputs``."""
    video = first_stream(probe, "video") or {}
    audio = first_stream(probe, "audio") or {}
    fmt = probe.get("format", {})
    return {
        "path": user_path,
        "size_bytes": size_bytes,
        "duration_s": duration_of(probe),
        "format": fmt.get("format_name"),
        "width": video.get("width"),
        "height": video.get("height"),
        "video_codec": video.get("codec_name"),
        "audio_codec": audio.get("codec_name"),
        "bit_rate": _number(fmt.get("bit_rate"), int),
    }
