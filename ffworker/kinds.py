"""Job kinds: which paths a request names, and the ffmpeg arguments that do the work.

A kind's *planner* turns a job's validated request into a ``Plan`` (ffmpeg
arguments, media duration, result fields) through a ``RunContext``, which
resolves and confines paths, probes inputs and hands out temporary output
names. The argument builders are pure functions of the request and ffprobe's
view of the inputs; the worker (``ffworker.worker``) runs every plan through
the same machinery and publishes. concat, hls and command live in
``ffworker.concat``, ``ffworker.hls`` and ``ffworker.rawcommand``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from ffworker import media
from ffworker.media import duration_of, first_stream

# User-facing codec names → ffmpeg encoders.
VIDEO_CODECS = {"h264": "libx264", "hevc": "libx265", "vp9": "libvpx-vp9", "av1": "libsvtav1", "copy": "copy"}
AUDIO_CODECS = {"aac": "aac", "opus": "libopus", "mp3": "libmp3lame", "copy": "copy", "none": None}
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")
QUALITY_HEIGHTS = {"240p": 240, "360p": 360, "480p": 480, "720p": 720, "1080p": 1080, "1440p": 1440, "2160p": 2160}

# Container (output suffix) → (ffmpeg muxer, video codecs it takes, audio codecs it takes).
CONTAINERS = {
    "mp4": ("mp4", {"h264", "hevc", "av1", "copy"}, {"aac", "mp3", "opus", "copy", "none"}),
    "mov": ("mov", {"h264", "hevc", "copy"}, {"aac", "mp3", "copy", "none"}),
    "mkv": ("matroska", set(VIDEO_CODECS), set(AUDIO_CODECS)),
    "webm": ("webm", {"vp9", "av1"}, {"opus", "none"}),
    "m4a": ("ipod", set(), {"aac", "copy"}),
    "mp3": ("mp3", set(), {"mp3", "copy"}),
    "ogg": ("ogg", set(), {"opus", "copy"}),
}
FASTSTART_MUXERS = {"mp4", "mov", "ipod"}

PRESETS = {
    "h264-360p": {"video": {"codec": "h264", "height": 360, "crf": 23, "preset": "veryfast"},
                  "audio": {"codec": "aac", "bitrate": "96k"}},
    "h264-480p": {"video": {"codec": "h264", "height": 480, "crf": 23, "preset": "veryfast"},
                  "audio": {"codec": "aac", "bitrate": "128k"}},
    "h264-720p": {"video": {"codec": "h264", "height": 720, "crf": 22, "preset": "veryfast"},
                  "audio": {"codec": "aac", "bitrate": "128k"}},
    "h264-1080p": {"video": {"codec": "h264", "height": 1080, "crf": 22, "preset": "veryfast"},
                   "audio": {"codec": "aac", "bitrate": "160k"}},
    "audio-aac": {"video": None, "audio": {"codec": "aac", "bitrate": "128k"}},
}
THUMBNAIL_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})
TRANSCODE_SUFFIXES = frozenset(f".{name}" for name in CONTAINERS)

# The demuxers ffprobe and ffmpeg may pick for a tenant's file (-format_whitelist).
# Left to auto-detection, a file named in.mp4 that holds an HLS playlist, a concat
# script or an SDP description would make ffmpeg open whatever files (or hosts)
# it lists: other tenants' media included. Only self-contained media formats.
INPUT_FORMATS = ",".join((
    "mov", "matroska", "webm", "mpegts", "mpeg", "avi", "flv", "asf", "mxf", "nut", "dv", "ogg",
    "mp3", "aac", "ac3", "eac3", "dts", "truehd", "mlp", "wav", "w64", "aiff", "caf", "flac", "amr",
    "ape", "wv", "tta", "ivf", "obu", "h264", "hevc", "m4v", "mjpeg", "yuv4mpegpipe", "gif",
    "image2", "png_pipe", "jpeg_pipe", "webp_pipe", "bmp_pipe", "tiff_pipe", "srt", "webvtt", "ass",
))


class PlanError(Exception):
    """The request cannot be done on these inputs (a deterministic failure)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Plan:
    args: list[str] | None            # ffmpeg arguments after the global options; None: nothing to run
    duration_s: float | None          # media time the run covers, for percent
    result: dict = field(default_factory=dict)  # kind-specific result fields besides outputs
    # After ffmpeg succeeded, before the outputs are probed and published: a step
    # that completes the outputs and returns more result fields.
    finish: Callable[[], dict] | None = None


@dataclass
class Output:
    """One output of a run: written at ``temp``, moved to ``final`` on success."""

    user_path: str
    final: Path
    temp: Path
    is_dir: bool = False
    entry: str | None = None          # a directory output's file that describes it (e.g. its master playlist)
    formats: str = INPUT_FORMATS      # demuxers allowed when probing it

    @property
    def described_path(self) -> Path:
        return self.temp / self.entry if self.entry else self.temp

    @property
    def described_user_path(self) -> str:
        return f"{self.user_path.rstrip('/')}/{self.entry}" if self.entry else self.user_path


class RunContext(Protocol):
    """What a planner may use of the run: confined paths, probing, temp outputs.

    Paths come back resolved and confined to the tenant's media directory;
    outputs and scratch files get in-flight names that the run removes on
    failure (and, for scratch files, always).
    """

    spec: dict
    settings: object

    def input(self, user_path: str) -> Path: ...

    def probe(self, path: Path, *, extradata_hash: bool = False) -> dict: ...

    def probe_many(self, paths: list[Path], *, extradata_hash: bool = False) -> list[dict]: ...

    def output(self, user_path: str, suffixes: frozenset[str] | None = None) -> Output: ...

    def output_dir(self, user_path: str, *, entry: str, formats: str) -> Output: ...

    def scratch(self, beside: Path, suffix: str) -> Path: ...


Planner = Callable[[RunContext], Plan]


def container_of(spec: dict, output: str) -> str:
    return spec.get("container") or Path(output).suffix.lower().lstrip(".")


# Without explicit settings, a transcode encodes with the first codec of these
# that the container can hold: h264+aac in mp4, vp9+opus in webm, mp3 in .mp3.
DEFAULT_VIDEO_CODECS = ("h264", "vp9")
DEFAULT_AUDIO_CODECS = ("aac", "opus", "mp3")


def resolved_codecs(spec: dict) -> tuple[dict | None, dict | None]:
    """The (video, audio) settings a transcode request asks for, presets expanded."""
    if spec.get("preset"):
        preset = PRESETS[spec["preset"]]
        return preset["video"], preset["audio"]
    video = spec.get("video")
    audio = spec.get("audio")
    _, video_ok, audio_ok = CONTAINERS[container_of(spec, spec["output"])]
    if video is None:
        video = _default_codec(DEFAULT_VIDEO_CODECS, video_ok)
    if audio is None:
        audio = _default_codec(DEFAULT_AUDIO_CODECS, audio_ok)
    return video, audio


def _default_codec(preferred: tuple[str, ...], allowed: set[str]) -> dict | None:
    """None for a container without that kind of stream (an audio-only container gets no video)."""
    return next(({"codec": codec} for codec in preferred if codec in allowed), None)


def transcode_rule_errors(spec: dict) -> dict[str, str]:
    """Submit-time rules that involve several fields; field → message."""
    container = container_of(spec, spec["output"])
    if container not in CONTAINERS:
        return {"container": f"unsupported container {container!r}; use one of {sorted(CONTAINERS)}"}
    if spec.get("preset") and (spec.get("video") or spec.get("audio")):
        return {"preset": "give either preset or explicit video/audio settings, not both"}
    video, audio = resolved_codecs(spec)
    _, video_ok, audio_ok = CONTAINERS[container]
    errors = {}
    if video is not None and video["codec"] not in video_ok:
        errors["video"] = f"{container} cannot hold {video['codec']} video" if video_ok else f"{container} holds no video"
    if audio is not None and audio["codec"] not in audio_ok:
        errors["audio"] = f"{container} cannot hold {audio['codec']} audio"
    return errors


def _video_filters(video: dict) -> str:
    height = video.get("height") or QUALITY_HEIGHTS.get(video.get("quality", ""))
    # -2 keeps the aspect ratio and rounds the width to an even number; encoders
    # with 4:2:0 chroma need both dimensions even.
    scale = f"scale=-2:{height}" if height else "scale=trunc(iw/2)*2:trunc(ih/2)*2"
    filters = [scale]
    if video.get("fps"):
        filters.append(f"fps={video['fps']}")
    return ",".join(filters)


def input_args(source: Path) -> list[str]:
    """``-i`` for a tenant's file, restricted to self-contained media formats."""
    return ["-format_whitelist", INPUT_FORMATS, "-i", str(source)]


def video_args(video: dict | None) -> list[str]:
    if video is None:
        return ["-vn"]
    encoder = VIDEO_CODECS[video["codec"]]
    if encoder == "copy":
        return ["-c:v", "copy"]
    args = ["-c:v", encoder, "-vf", _video_filters(video), "-pix_fmt", "yuv420p"]
    if "crf" in video:
        args += ["-crf", str(video["crf"])]
    if encoder in ("libx264", "libx265"):
        args += ["-preset", video.get("preset", "veryfast")]
    if encoder == "libvpx-vp9":
        args += ["-b:v", "0", "-row-mt", "1", "-deadline", "good", "-cpu-used", "4"]
    return args


def audio_args(audio: dict | None) -> list[str]:
    if audio is None or audio["codec"] == "none":
        return ["-an"]
    encoder = AUDIO_CODECS[audio["codec"]]
    args = ["-c:a", encoder]
    if encoder != "copy" and audio.get("bitrate"):
        args += ["-b:a", str(audio["bitrate"])]
    return args


def plan_transcode(spec: dict, source: Path, probe: dict, target: Path) -> Plan:
    video, audio = resolved_codecs(spec)
    if video is not None and first_stream(probe, "video") is None and audio is None:
        raise PlanError("invalid_input", "the input has no video stream")
    if first_stream(probe, "video") is None and first_stream(probe, "audio") is None:
        raise PlanError("invalid_input", "the input has no audio or video stream")
    muxer = CONTAINERS[container_of(spec, spec["output"])][0]
    args = input_args(source) + ["-map", "0:v:0?", "-map", "0:a:0?"]
    args += video_args(video) + audio_args(audio)
    if muxer in FASTSTART_MUXERS:
        args += ["-movflags", "+faststart"]
    args += ["-f", muxer, "-y", str(target)]
    return Plan(args=args, duration_s=duration_of(probe))


def plan_thumbnail(spec: dict, source: Path, probe: dict, target: Path) -> Plan:
    if first_stream(probe, "video") is None:
        raise PlanError("invalid_input", "the input has no video stream")
    duration = duration_of(probe)
    at_s = spec.get("at_s")
    if at_s is None:
        at_s = round(duration * 0.1, 3) if duration else 0.0
    elif duration is not None and at_s >= duration:
        raise PlanError("invalid_request", f"at_s={at_s} is beyond the input's duration of {duration:.3f} s")
    args = ["-ss", f"{at_s:.3f}", *input_args(source), "-frames:v", "1", "-an"]
    if spec.get("width"):
        args += ["-vf", f"scale={spec['width']}:-2"]
    suffix = target.suffix.lower()
    if suffix in (".jpg", ".jpeg"):
        args += ["-q:v", "2"]
    elif suffix == ".webp":
        args += ["-c:v", "libwebp"]
    args += ["-update", "1", "-y", str(target)]
    return Plan(args=args, duration_s=None, result={"at_s": at_s})


# -- planners: from a job's spec to a Plan, through the run's context ----------


def plan_probe_job(ctx: RunContext) -> Plan:
    probe = ctx.probe(ctx.input(ctx.spec["input"]))
    return Plan(args=None, duration_s=duration_of(probe), result={"media": media.summarize(probe)})


def plan_transcode_job(ctx: RunContext) -> Plan:
    source = ctx.input(ctx.spec["input"])
    probe = ctx.probe(source)
    target = ctx.output(ctx.spec["output"])
    return plan_transcode(ctx.spec, source, probe, target.temp)


def plan_thumbnail_job(ctx: RunContext) -> Plan:
    source = ctx.input(ctx.spec["input"])
    probe = ctx.probe(source)
    target = ctx.output(ctx.spec["output"])
    return plan_thumbnail(ctx.spec, source, probe, target.temp)


# Which request fields name input files (a string or a list of strings) and
# output files (with their allowed suffixes); the API confines them at submit
# time. The hls output directory and the paths inside a command's argv are
# checked by their request schemas (ffworker.hls.path_errors,
# ffworker.rawcommand.path_errors).
CONCAT_SUFFIXES = TRANSCODE_SUFFIXES
INPUT_FIELDS: dict[str, tuple[str, ...]] = {
    "probe": ("input",),
    "transcode": ("input",),
    "thumbnail": ("input",),
    "concat": ("inputs",),
    "hls": ("input",),
}
OUTPUT_FIELDS: dict[str, dict[str, frozenset[str] | None]] = {
    "transcode": {"output": TRANSCODE_SUFFIXES},
    "thumbnail": {"output": THUMBNAIL_SUFFIXES},
    "concat": {"output": CONCAT_SUFFIXES},
}
