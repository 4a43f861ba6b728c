"""transcode: one input re-encoded (or stream-copied) into one output file.

The argument builders are pure functions of the request and ffprobe's view of
the input; concat reuses the container tables and the suffix list.
"""
from __future__ import annotations

from pathlib import Path

from marshmallow import ValidationError, fields, validate, validates_schema

from ffworker.kinds.base import Kind, Plan, PlanError, RunContext, field_check, input_args
from ffworker.kinds.request import JobCommonSchema, RelativePath, StrictSchema, even
from ffworker.media import duration_of, first_stream

NAME = "transcode"

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
TRANSCODE_SUFFIXES = frozenset(f".{name}" for name in CONTAINERS)


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


# -- the request ------------------------------------------------------------------


class VideoSchema(StrictSchema):
    codec = fields.String(load_default="h264", validate=validate.OneOf(VIDEO_CODECS))
    crf = fields.Integer(validate=validate.Range(0, 51))
    preset = fields.String(validate=validate.OneOf(X264_PRESETS))
    height = fields.Integer(validate=[validate.Range(16, 4320), even])
    quality = fields.String(validate=validate.OneOf(QUALITY_HEIGHTS))
    fps = fields.Float(validate=validate.Range(min=1, max=240))

    @validates_schema
    def _one_size(self, data, **_):
        if "height" in data and "quality" in data:
            raise ValidationError("give height or quality, not both", "quality")


class AudioSchema(StrictSchema):
    codec = fields.String(load_default="aac", validate=validate.OneOf(AUDIO_CODECS))
    bitrate = fields.String(validate=validate.Regexp(r"^\d{1,3}k\Z", error="a bitrate like '128k'"))


class TranscodeRequestSchema(JobCommonSchema):
    input = RelativePath(required=True)
    output = RelativePath(required=True)
    preset = fields.String(validate=validate.OneOf(PRESETS))
    video = fields.Nested(VideoSchema)
    audio = fields.Nested(AudioSchema)
    container = fields.String(validate=validate.OneOf(CONTAINERS))

    @validates_schema
    def _rules(self, data, **_):
        if "output" not in data:
            return
        errors = transcode_rule_errors(data)
        if errors:
            raise ValidationError({field: [message] for field, message in errors.items()})


# -- ffmpeg arguments -------------------------------------------------------------


def _video_filters(video: dict) -> str:
    height = video.get("height") or QUALITY_HEIGHTS.get(video.get("quality", ""))
    # -2 keeps the aspect ratio and rounds the width to an even number; encoders
    # with 4:2:0 chroma need both dimensions even.
    scale = f"scale=-2:{height}" if height else "scale=trunc(iw/2)*2:trunc(ih/2)*2"
    filters = [scale]
    if video.get("fps"):
        filters.append(f"fps={video['fps']}")
    return ",".join(filters)


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


def plan_job(ctx: RunContext) -> Plan:
    source = ctx.input(ctx.spec["input"])
    probe = ctx.probe(source)
    target = ctx.output(ctx.spec["output"])
    return plan_transcode(ctx.spec, source, probe, target.temp)


check = field_check(inputs=("input",), outputs={"output": TRANSCODE_SUFFIXES})
KIND = Kind(NAME, TranscodeRequestSchema, check, plan_job)
