"""Parse the machine-readable progress that ffmpeg writes with `-progress pipe:1 -nostats`.

ffmpeg emits blocks of `key=value` lines, each closed by `progress=continue`
or `progress=end`. Every block repeats all keys, so the parser keeps the latest
known value per key and publishes a snapshot whenever a block closes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# Most precise first. `out_time_ms` is in microseconds as well: a long-standing
# ffmpeg quirk that is kept for backwards compatibility.
_TIME_KEYS = ("out_time_us", "out_time_ms", "out_time")
_MICROSECONDS = 1_000_000
_UNSET = object()  # a value that could not be parsed: leave the previous one alone


@dataclass(frozen=True)
class Progress:
    frame: int | None
    fps: float | None
    speed: float | None
    out_time_s: float | None
    percent: float | None
    eta_s: float | None
    ended: bool

    def as_dict(self) -> dict:
        return {
            "percent": _round(self.percent, 1),
            "frame": self.frame,
            "fps": _round(self.fps, 2),
            "speed": _round(self.speed, 3),
            "out_time_s": _round(self.out_time_s, 3),
            "eta_s": _round(self.eta_s, 3),
        }


class ProgressParser:
    def __init__(self, duration_s: float | None) -> None:
        self._duration_s = duration_s if duration_s and duration_s > 0 else None
        self._frame: int | None = None
        self._fps: float | None = None
        self._speed: float | None = None
        self._out_time_s: float | None = None
        self._block_times: dict[str, float | None] = {}

    def feed_line(self, line: str) -> Progress | None:
        key, sep, raw = line.strip().partition("=")
        key, value = key.strip(), raw.strip()
        if not sep or not key:
            return None
        if key == "progress":
            return self._close_block(value)
        self._remember(key, value)
        return None

    def _remember(self, key: str, value: str) -> None:
        if key == "frame":
            self._frame = _keep(self._frame, _parse_count(value))
        elif key == "fps":
            self._fps = _keep(self._fps, _parse_non_negative(value))
        elif key == "speed":
            self._speed = _keep(self._speed, _parse_speed(value))
        elif key in _TIME_KEYS:
            parsed = _parse_clock(value) if key == "out_time" else _parse_microseconds(value)
            if parsed is not _UNSET:
                self._block_times[key] = parsed

    def _close_block(self, value: str) -> Progress | None:
        if value not in ("continue", "end"):
            return None
        self._out_time_s = self._resolve_out_time()
        self._block_times = {}
        return self._snapshot(ended=value == "end")

    def _resolve_out_time(self) -> float | None:
        # A block without any time key keeps the last position; otherwise the
        # block's own values win, so a stale key never outranks a fresh one.
        present = [self._block_times[k] for k in _TIME_KEYS if k in self._block_times]
        if not present:
            return self._out_time_s
        return next((t for t in present if t is not None), None)

    def _snapshot(self, *, ended: bool) -> Progress:
        return Progress(
            frame=self._frame,
            fps=self._fps,
            speed=self._speed,
            out_time_s=self._out_time_s,
            percent=self._percent(ended),
            eta_s=0.0 if ended else self._eta_s(),
            ended=ended,
        )

    def _percent(self, ended: bool) -> float | None:
        if self._duration_s is None:
            return None
        if ended:
            return 100.0
        if self._out_time_s is None:
            return None
        return min(100.0, max(0.0, self._out_time_s / self._duration_s * 100.0))

    def _eta_s(self) -> float | None:
        if self._duration_s is None or self._out_time_s is None or not self._speed:
            return None
        return max(0.0, (self._duration_s - self._out_time_s) / self._speed)


def _keep(previous, parsed):
    return previous if parsed is _UNSET else parsed


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _is_unknown(value: str) -> bool:
    return value.upper() == "N/A" or value == ""


def _parse_float(value: str):
    """A finite float, None for N/A, or _UNSET for anything unparseable."""
    if _is_unknown(value):
        return None
    try:
        number = float(value)
    except ValueError:
        return _UNSET
    return number if math.isfinite(number) else _UNSET


def _parse_non_negative(value: str):
    number = _parse_float(value)
    if isinstance(number, float) and number < 0:
        return None
    return number


def _parse_count(value: str):
    number = _parse_non_negative(value)
    return int(number) if isinstance(number, float) else number


def _parse_speed(value: str):
    # "1.9x", " 783x" (ffmpeg pads the field), or N/A.
    return _parse_non_negative(value.removesuffix("x").removesuffix("X").strip())


def _parse_microseconds(value: str):
    # The start-up sentinel is INT64_MIN+1; any negative time means "not yet known".
    number = _parse_non_negative(value)
    return number / _MICROSECONDS if isinstance(number, float) else number


def _parse_clock(value: str):
    """HH:MM:SS.ffffff -> seconds; negative clocks are the start-up sentinel."""
    if _is_unknown(value) or value.startswith("-"):
        return None
    parts = value.split(":")
    if len(parts) != 3:
        return _UNSET
    try:
        hours, minutes, seconds = int(parts[0]), int(parts[1]), float(parts[2])
    except ValueError:
        return _UNSET
    if hours < 0 or minutes < 0 or not math.isfinite(seconds) or seconds < 0:
        return _UNSET
    return hours * 3600 + minutes * 60 + seconds
