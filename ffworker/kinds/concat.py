"""concat: merge clips in order, by stream copy when they allow it, else by re-encoding.

``mode``:

- ``copy``: the concat demuxer stream-copies every input into the output. Fast
  (no decoding), and only correct when the inputs are interchangeable at the
  bitstream level; on anything else it fails with ``incompatible_inputs``
  before ffmpeg runs, never with a file that plays wrong.
- ``reencode``: every input is normalised (scale + pad to one size with the
  aspect ratio kept, one frame rate, one sample rate and channel layout) and
  joined with the concat filter. An input without audio gets silence (and one
  without video black frames) for exactly its length, so audio and video stay
  in sync across every joint.
- ``auto`` (default): ``copy`` when the inputs are compatible, else
  ``reencode``; the result says which mode ran and why.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from marshmallow import ValidationError, fields, validate, validates_schema

from ffworker import media, process
from ffworker.kinds import transcode
from ffworker.kinds.base import INPUT_FORMATS, Kind, Plan, PlanError, RunContext, field_check, input_args
from ffworker.kinds.request import JobCommonSchema, RelativePath, even

NAME = "concat"
MODES = ("auto", "copy", "reencode")
CONCAT_SUFFIXES = transcode.TRANSCODE_SUFFIXES
AUDIO_CONTAINERS = frozenset({"m4a", "mp3", "ogg"})
# Codecs each container holds by stream copy (ffprobe's codec names); None: any.
COPY_CODECS: dict[str, tuple[frozenset[str] | None, frozenset[str] | None]] = {
    "mp4": (frozenset({"h264", "hevc", "av1", "vp9", "mpeg4"}),
            frozenset({"aac", "mp3", "opus", "ac3", "eac3", "alac", "flac"})),
    "mov": (frozenset({"h264", "hevc", "mpeg4", "prores", "mjpeg"}),
            frozenset({"aac", "mp3", "alac", "ac3", "pcm_s16le", "pcm_s24le"})),
    "mkv": (None, None),
    "webm": (frozenset({"vp8", "vp9", "av1"}), frozenset({"opus", "vorbis"})),
    "m4a": (frozenset(), frozenset({"aac", "alac"})),
    "mp3": (frozenset(), frozenset({"mp3"})),
    "ogg": (frozenset(), frozenset({"opus", "vorbis", "flac"})),
}
# Re-encoding: container → (video encoder args without crf, default crf, audio encoder args).
_X264 = lambda preset: ["-c:v", "libx264", "-preset", preset, "-pix_fmt", "yuv420p"]  # noqa: E731
_VP9 = lambda preset: ["-c:v", "libvpx-vp9", "-b:v", "0", "-row-mt", "1", "-deadline", "good",  # noqa: E731
                       "-cpu-used", "4", "-pix_fmt", "yuv420p"]
ENCODERS = {
    "mp4": (_X264, 20, ["-c:a", "aac", "-b:a", "160k"]),
    "mov": (_X264, 20, ["-c:a", "aac", "-b:a", "160k"]),
    "mkv": (_X264, 20, ["-c:a", "aac", "-b:a", "160k"]),
    "webm": (_VP9, 32, ["-c:a", "libopus", "-b:a", "128k"]),
    "m4a": (None, None, ["-c:a", "aac", "-b:a", "160k"]),
    "mp3": (None, None, ["-c:a", "libmp3lame", "-b:a", "192k"]),
    "ogg": (None, None, ["-c:a", "libopus", "-b:a", "128k"]),
}
_NTSC_RATES = (Fraction(24000, 1001), Fraction(30000, 1001), Fraction(60000, 1001))
_MAX_SHOWN_DIFFERENCES = 4
_MAX_SHOWN_INPUTS = 3


@dataclass(frozen=True)
class Clip:
    """One input as the merge sees it."""

    number: int                    # 1-based position in the request
    user_path: str
    path: Path
    duration_s: float              # the whole file (what the concat demuxer advances by)
    video: dict | None
    audio: dict | None
    streams: tuple[str, ...]       # codec types in stream order

    @property
    def name(self) -> str:
        return f"input {self.number} ({self.user_path!r})"

    def reference(self, video_output: bool) -> dict | None:
        """The stream that sets this input's timeline in a re-encoded merge: the video's, when
        the output has video and the input too (its audio follows it), else the audio's."""
        return self.video if video_output and self.video else self.audio or self.video

    def segment_s(self, video_output: bool) -> float:
        reference = self.reference(video_output)
        return _number((reference or {}).get("duration")) or self.duration_s

    def start_s(self, video_output: bool) -> float:
        try:
            start = float((self.reference(video_output) or {}).get("start_time"))
        except (TypeError, ValueError):
            return 0.0
        return start if abs(start) < 1e9 else 0.0


@dataclass(frozen=True)
class Target:
    """What a re-encoded merge normalises every input to."""

    width: int | None
    height: int | None
    fps: Fraction | None
    sample_rate: int | None
    channel_layout: str | None

    @property
    def has_video(self) -> bool:
        return self.fps is not None

    @property
    def has_audio(self) -> bool:
        return self.sample_rate is not None

    def as_result(self) -> dict:
        result = {}
        if self.has_video:
            result.update(width=self.width, height=self.height, fps=_fraction_text(self.fps))
        if self.has_audio:
            result.update(sample_rate=self.sample_rate, channel_layout=self.channel_layout)
        return result


# -- the request --------------------------------------------------------------------


class ConcatRequestSchema(JobCommonSchema):
    inputs = fields.List(RelativePath(), required=True, validate=validate.Length(min=2, max=100))
    output = RelativePath(required=True)
    mode = fields.String(load_default="auto", validate=validate.OneOf(MODES))
    # Re-encoding only: the size, frame rate and quality every input is normalised to
    # (default: the first input's size and frame rate).
    width = fields.Integer(validate=[validate.Range(16, 7680), even])
    height = fields.Integer(validate=[validate.Range(16, 4320), even])
    fps = fields.Float(validate=validate.Range(min=1, max=240))
    crf = fields.Integer(validate=validate.Range(0, 51))
    preset = fields.String(validate=validate.OneOf(transcode.X264_PRESETS))

    @validates_schema
    def _copy_takes_no_encoding(self, data, **_):
        if data.get("mode") == "copy":
            given = [name for name in ("width", "height", "fps", "crf", "preset") if name in data]
            if given:
                raise ValidationError({name: ["applies to re-encoding only, not to mode 'copy'"] for name in given})


# -- the planner ------------------------------------------------------------------


def plan_job(ctx: RunContext) -> Plan:
    spec = ctx.spec
    sources = [ctx.input(user_path) for user_path in spec["inputs"]]
    try:
        probes = ctx.probe_many(sources, extradata_hash=True)
    except process.ProbeFailed as exc:
        raise process.ProbeFailed(f"input {exc.index + 1} ({spec['inputs'][exc.index]!r}): {exc}",
                                  exc.stderr_tail, exc.index) from None
    clips = [clip_from_probe(number, user_path, path, probe)
             for number, (user_path, path, probe) in enumerate(zip(spec["inputs"], sources, probes), start=1)]
    container = transcode.container_of({}, spec["output"])
    target = ctx.output(spec["output"], suffixes=CONCAT_SUFFIXES)
    mode, reason = choose_mode(spec, clips, container)
    if mode == "copy":
        listing = ctx.scratch(target.final, ".ffconcat")
        listing.write_bytes(concat_list(clips))
        args = copy_args(listing, clips, container, target.temp)
        duration = sum(clip.duration_s for clip in clips)
        normalised = None
    else:
        goal = reencode_target(spec, clips, container)
        args, duration = reencode_args(spec, clips, goal, container, target.temp)
        normalised = goal.as_result()
    result = {"mode": mode, "reason": reason, "inputs": len(clips)}
    if normalised is not None:
        result["normalised_to"] = normalised
    return Plan(args=args, duration_s=duration, result=result)


# -- inputs -------------------------------------------------------------------------


def clip_from_probe(number: int, user_path: str, path: Path, probe: dict) -> Clip:
    video, audio = media.main_stream(probe, "video"), media.main_stream(probe, "audio")
    name = f"input {number} ({user_path!r})"
    if video is None and audio is None:
        raise PlanError("invalid_input", f"{name} has no audio or video stream")
    duration = media.duration_of(probe)
    if duration is None:
        raise PlanError("invalid_input", f"the duration of {name} is unknown")
    return Clip(
        number=number, user_path=user_path, path=path, duration_s=duration, video=video, audio=audio,
        streams=tuple(s.get("codec_type") or "unknown" for s in probe.get("streams", [])),
    )


# -- compatibility ------------------------------------------------------------------


def copy_signature(clip: Clip, audio_only: bool = False) -> dict[str, object]:
    """What must be equal across inputs for the concat demuxer to stream-copy them.

    The demuxer takes every stream's parameters from the first input and
    matches later inputs' streams by index, so the stream layout, codec
    parameters (down to the SPS/PPS a decoder is initialised with) and
    timing must all agree (for an audio-only output, those of the audio).
    """
    signature: dict[str, object] = {"stream layout": ",".join(clip.streams)}
    if not audio_only:
        signature["video track"] = "present" if clip.video else "absent"
    signature["audio track"] = "present" if clip.audio else "absent"
    if clip.video and not audio_only:
        v = clip.video
        signature.update({
            "video codec": v.get("codec_name"),
            "video profile": v.get("profile"),
            "width": v.get("width"),
            "height": v.get("height"),
            "pixel format": v.get("pix_fmt"),
            "sample aspect ratio": str(media.sample_aspect_ratio(v)),
            "rotation": media.rotation(v),
            "frame rate": v.get("r_frame_rate"),
            "video time base": v.get("time_base"),
            "field order": v.get("field_order"),
            "colour space": (v.get("color_space"), v.get("color_transfer"), v.get("color_primaries")),
            "video codec parameters (SPS/PPS)": v.get("extradata_hash"),
        })
    if clip.audio:
        a = clip.audio
        signature.update({
            "audio codec": a.get("codec_name"),
            "audio profile": a.get("profile"),
            "sample rate": a.get("sample_rate"),
            "channels": a.get("channels"),
            "channel layout": a.get("channel_layout"),
            "audio codec parameters": a.get("extradata_hash"),
        })
    return signature


def copy_problems(clips: list[Clip], container: str) -> list[str]:
    """Why these inputs cannot be stream-copied into this container; empty when they can."""
    problems = []
    audio_only = container in AUDIO_CONTAINERS
    first = copy_signature(clips[0], audio_only)
    differing = []
    for clip in clips[1:]:
        signature = copy_signature(clip, audio_only)
        # A track's details are compared only where both inputs have it; otherwise
        # its presence is the difference.
        differences = [
            f"{label} {_shown(signature[label])} (input 1: {_shown(first[label])})"
            for label in first if label in signature and signature[label] != first[label]
        ]
        if differences:
            shown = differences[:_MAX_SHOWN_DIFFERENCES]
            if len(differences) > len(shown):
                shown.append(f"and {len(differences) - len(shown)} more")
            differing.append(f"{clip.name} differs in " + ", ".join(shown))
    if differing:
        shown = differing[:_MAX_SHOWN_INPUTS]
        if len(differing) > len(shown):
            shown.append(f"and {len(differing) - len(shown)} more inputs differ")
        problems.append("; ".join(shown))
    video_ok, audio_ok = COPY_CODECS[container]
    codecs = {(c.video or {}).get("codec_name") for c in clips if c.video and not audio_only} - {None}
    if video_ok is not None and codecs - video_ok:
        problems.append(f"{container} cannot hold {', '.join(sorted(codecs - video_ok))} video")
    codecs = {(c.audio or {}).get("codec_name") for c in clips if c.audio} - {None}
    if audio_ok is not None and codecs - audio_ok:
        problems.append(f"{container} cannot hold {', '.join(sorted(codecs - audio_ok))} audio")
    if audio_only and any(c.audio is None for c in clips):
        problems.append("an input has no audio track")
    return problems


def requested_problems(spec: dict, clips: list[Clip], container: str) -> list[str]:
    """Re-encoding settings in the request that a stream copy would not honour."""
    video = clips[0].video
    problems = []
    if video is None or container in AUDIO_CONTAINERS:
        return problems
    width, height = media.display_size(video)
    if spec.get("width") is not None and spec["width"] != width:
        problems.append(f"the requested width {spec['width']} differs from the inputs' {width}")
    if spec.get("height") is not None and spec["height"] != height:
        problems.append(f"the requested height {spec['height']} differs from the inputs' {height}")
    if spec.get("fps") is not None and requested_fps(spec["fps"]) != media.frame_rate(video):
        problems.append(f"the requested frame rate {spec['fps']:g} differs from the inputs'")
    return problems


def choose_mode(spec: dict, clips: list[Clip], container: str) -> tuple[str, str]:
    """(mode that runs, why)."""
    mode = spec.get("mode", "auto")
    if mode == "reencode":
        return "reencode", "re-encoding was requested"
    problems = copy_problems(clips, container) + requested_problems(spec, clips, container)
    if mode == "copy":
        if problems:
            raise PlanError("incompatible_inputs", "cannot stream-copy these inputs: " + "; ".join(problems)
                            + ". Use mode 'reencode' (or 'auto') to normalise them.")
        return "copy", "stream copy was requested and the inputs are compatible"
    if problems:
        return "reencode", "re-encoded because " + "; ".join(problems)
    return "copy", ("every input has the same codecs and codec parameters, dimensions, pixel format, "
                    "frame rate and time base, and audio format: stream-copied")


# -- copy ---------------------------------------------------------------------------


def quote(path: bytes) -> bytes:
    """A path as a single-quoted concat-script token: ' becomes '\\'' (close, escaped quote, reopen)."""
    return b"'" + path.replace(b"'", b"'\\''") + b"'"


def concat_list(clips: list[Clip]) -> bytes:
    """The concat demuxer's script: one absolute, quoted path per line."""
    lines = [b"ffconcat version 1.0"]
    for clip in clips:
        raw = os.fsencode(clip.path)
        if any(byte < 0x20 or byte == 0x7F for byte in raw):
            # The script is line-based: a newline in a name would start a new directive.
            raise PlanError("invalid_input", f"{clip.name} resolves to a name with a control character")
        lines.append(b"file " + quote(raw))
    return b"\n".join(lines) + b"\n"


def copy_args(listing: Path, clips: list[Clip], container: str, output: Path) -> list[str]:
    # -safe 0: the script names absolute paths (safe mode only takes relative
    # names made of portable characters, which real file names with spaces or
    # quotes are not). Nothing the tenant wrote reaches the script: every path
    # in it was confined to the tenant's directory and resolved (symlinks
    # followed) by the worker, each input was probed as a self-contained media
    # file, and the demuxer may open local files only (-protocol_whitelist) of
    # media formats only (-format_whitelist, inherited by every file it opens).
    args = ["-f", "concat", "-safe", "0", "-protocol_whitelist", "file",
            "-format_whitelist", f"concat,{INPUT_FORMATS}", "-i", str(listing)]
    if container in AUDIO_CONTAINERS or all(clip.video is None for clip in clips):
        args += ["-map", "0:a:0"]
    else:
        args += ["-map", "0:v:0", "-map", "0:a:0?"]
    args += ["-c", "copy"]
    return args + _muxer_args(container, output)


def _muxer_args(container: str, output: Path) -> list[str]:
    muxer = transcode.CONTAINERS[container][0]
    args = ["-movflags", "+faststart"] if muxer in transcode.FASTSTART_MUXERS else []
    return args + ["-f", muxer, "-y", str(output)]


# -- re-encode -----------------------------------------------------------------------


def requested_fps(value: float) -> Fraction:
    for rate in _NTSC_RATES:
        if abs(float(rate) - value) < 0.005:
            return rate
    return Fraction(value).limit_denominator(1001)


def reencode_target(spec: dict, clips: list[Clip], container: str) -> Target:
    """The first input's (or the requested) size and frame rate, and the first audio's format."""
    audio_only = container in AUDIO_CONTAINERS
    first_video = next((c.video for c in clips if c.video), None)
    first_audio = next((c.audio for c in clips if c.audio), None)
    if audio_only and first_audio is None:
        raise PlanError("invalid_input", "no input has an audio stream")
    width = height = fps = None
    if first_video is not None and not audio_only:
        width, height = media.display_size(first_video)
        if spec.get("width") and spec.get("height"):
            width, height = spec["width"], spec["height"]
        elif spec.get("height"):
            width, height = _even(width * spec["height"] / height), spec["height"]
        elif spec.get("width"):
            width, height = spec["width"], _even(height * spec["width"] / width)
        fps = requested_fps(spec["fps"]) if spec.get("fps") else (media.frame_rate(first_video) or Fraction(30))
    sample_rate = layout = None
    if first_audio is not None:
        sample_rate = int(first_audio.get("sample_rate") or 48000)
        if sample_rate not in (44100, 48000) or container in ("webm", "ogg"):
            sample_rate = 48000  # what every encoder here takes (opus: 48 kHz only)
        channels = int(first_audio.get("channels") or 2)
        layout = first_audio.get("channel_layout") or {1: "mono", 2: "stereo", 6: "5.1"}.get(channels, "stereo")
        if channels > 2 and container not in ("mp4", "mov", "mkv", "m4a"):
            layout = "stereo"
    return Target(width, height, fps, sample_rate, layout)


def segment_lengths(clips: list[Clip], target: Target) -> list[tuple[int | None, int | None]]:
    """Per input: (video frames, audio samples) it contributes.

    Counts are rounded on the running total, not per input, so the merged
    length stays within half a frame of the sum of the inputs however many
    there are; each joint falls on a frame boundary and the audio of every
    segment is exactly as long as its video.
    """
    lengths = []
    elapsed = Fraction(0)
    frames_done = samples_done = 0
    for clip in clips:
        elapsed += Fraction(clip.segment_s(target.has_video))
        frames = None
        if target.has_video:
            frames = max(1, round(elapsed * target.fps) - frames_done)
            frames_done += frames
            end = Fraction(frames_done) / target.fps
        else:
            end = elapsed
        samples = None
        if target.has_audio:
            samples = max(1, round(end * target.sample_rate) - samples_done)
            samples_done += samples
        lengths.append((frames, samples))
    return lengths


def reencode_graph(clips: list[Clip], target: Target) -> tuple[str, float]:
    """The -filter_complex graph (outputs [v] and/or [a]) and the merged duration in seconds."""
    chains, pads = [], []
    total = Fraction(0)
    for index, (clip, (frames, samples)) in enumerate(zip(clips, segment_lengths(clips, target))):
        start = f"{clip.start_s(target.has_video):.6f}"
        if target.has_video:
            size = f"{target.width}:{target.height}"
            if clip.video is not None:
                square = "" if media.sample_aspect_ratio(clip.video) == 1 else "scale=w=trunc(iw*sar/2)*2:h=ih,setsar=1,"
                chains.append(
                    f"[{index}:v:0]setpts=PTS-({start})/TB,{square}"
                    f"scale=w={target.width}:h={target.height}:force_original_aspect_ratio=decrease"
                    f":force_divisible_by=2,pad={size}:(ow-iw)/2:(oh-ih)/2:color=black,setsar=1,"
                    f"fps=fps={_fraction_text(target.fps)}:start_time=0,format=yuv420p,"
                    f"tpad=stop=-1:stop_mode=clone,trim=end_frame={frames},setpts=PTS-STARTPTS[v{index}]"
                )
            else:
                chains.append(
                    f"color=c=black:s={target.width}x{target.height}:r={_fraction_text(target.fps)},"
                    f"format=yuv420p,setsar=1,trim=end_frame={frames},setpts=PTS-STARTPTS[v{index}]"
                )
            pads.append(f"[v{index}]")
            total += Fraction(frames) / target.fps
        if target.has_audio:
            audio_format = (f"aformat=sample_fmts=fltp:sample_rates={target.sample_rate}"
                            f":channel_layouts={target.channel_layout}")
            if clip.audio is not None:
                chains.append(
                    f"[{index}:a:0]asetpts=PTS-({start})/TB,"
                    f"aresample=osr={target.sample_rate}:async=1:first_pts=0,{audio_format},"
                    f"apad,atrim=end_sample={samples},asetpts=PTS-STARTPTS[a{index}]"
                )
            else:
                chains.append(
                    f"anullsrc=r={target.sample_rate}:cl={target.channel_layout},{audio_format},"
                    f"atrim=end_sample={samples},asetpts=PTS-STARTPTS[a{index}]"
                )
            pads.append(f"[a{index}]")
            if not target.has_video:
                total += Fraction(samples, target.sample_rate)
    outputs = ("[v]" if target.has_video else "") + ("[a]" if target.has_audio else "")
    chains.append(f"{''.join(pads)}concat=n={len(clips)}:v={int(target.has_video)}:a={int(target.has_audio)}{outputs}")
    return ";".join(chains), float(total)


def reencode_args(
    spec: dict, clips: list[Clip], target: Target, container: str, output: Path,
) -> tuple[list[str], float]:
    graph, duration = reencode_graph(clips, target)
    args = []
    for clip in clips:
        args += input_args(clip.path)
    args += ["-filter_complex", graph]
    video_encoder, default_crf, audio_args = ENCODERS[container]
    if target.has_video:
        args += ["-map", "[v]", *video_encoder(spec.get("preset") or "veryfast"),
                 "-crf", str(spec.get("crf", default_crf))]
    if target.has_audio:
        args += ["-map", "[a]", *audio_args]
    return args + _muxer_args(container, output), duration


# -- helpers ----------------------------------------------------------------------------


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number == number and number >= 0 else None


def _even(value: float) -> int:
    return max(2, int(round(value / 2)) * 2)


def _fraction_text(rate: Fraction) -> str:
    return str(rate.numerator) if rate.denominator == 1 else f"{rate.numerator}/{rate.denominator}"


def _shown(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return "/".join(str(v) for v in value if v) or "unspecified"
    text = str(value)
    return text[:23] + "…" if len(text) > 24 else text


check = field_check(inputs=("inputs",), outputs={"output": CONCAT_SUFFIXES})
KIND = Kind(NAME, ConcatRequestSchema, check, plan_job)
