"""hls: an HLS ladder — one media playlist per rendition and a master playlist.

One ffmpeg run decodes the input once and encodes every rendition (H.264 +
AAC in MPEG-TS segments) with key frames forced on the segment boundaries, so
the renditions' segments line up for switching. The whole ladder is built in
a temporary directory beside the target and renamed into place when it is
complete: a failed or cancelled job leaves nothing. After the run, the master
playlist is rewritten with the bit rates actually measured on the segments.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path, PurePath

from marshmallow import ValidationError, fields, validate, validates_schema

from ffworker import media, paths, process
from ffworker.kinds.base import Kind, Media, Plan, PlanError, RunContext, field_check, input_args, media_of
from ffworker.kinds.request import JobCommonSchema, RelativePath, even
from ffworker.media import display_size, frame_rate, main_stream

NAME = "hls"
DEFAULT_RENDITIONS = (360, 720)
DEFAULT_SEGMENT_S = 6.0
MASTER = "master.m3u8"
PLAYLIST_FORMATS = "hls,mpegts"
CRF = 21
AUDIO_BITRATE = "128k"
# Cap of each rendition's bit rate (kbit/s) by height, for players on a budget;
# CRF decides below the cap.
MAXRATE_KBPS = ((240, 500), (360, 900), (480, 1500), (720, 3000), (1080, 6000), (1440, 10000), (2160, 18000))
_AVC_PROFILES = {"Constrained Baseline": "42C0", "Baseline": "4200", "Main": "4D40", "High": "6400"}
_AAC_PROFILES = {"LC": "mp4a.40.2", "HE-AAC": "mp4a.40.5", "HE-AACv2": "mp4a.40.29"}


def ladder(requested: list[int], source_height: int) -> tuple[list[int], list[int]]:
    """(heights to encode, heights dropped): never above the source; at least one, the source's own."""
    keep = sorted({h for h in requested if h <= source_height})
    dropped = sorted({h for h in requested if h > source_height})
    if not keep:
        keep = [max(2, source_height - source_height % 2)]
    return keep, dropped


def rendition_name(height: int) -> str:
    return f"{height}p"


def maxrate_kbps(height: int) -> int:
    return next((rate for limit, rate in MAXRATE_KBPS if height <= limit), MAXRATE_KBPS[-1][1])


# -- output directory rules (submit time and run time) ----------------------------


def replace_problem(final: Path, user_path: str) -> str | None:
    """Why an existing directory must not be replaced, or None."""
    if final.is_dir() and not (final / MASTER).is_file():
        return _not_a_ladder(user_path)
    return None


def _not_a_ladder(user_path: str) -> str:
    return (f"output_dir {user_path!r} exists and holds no {MASTER}; overwrite replaces only "
            "a previous HLS ladder, never another directory")


def contains(directory: PurePath, path: PurePath) -> bool:
    return os.path.commonpath([directory, path]) == str(directory)


def output_dir_problems(media: Media, spec: dict) -> list[str]:
    """``output_dir`` confined, absent unless overwrite, replaceable, and not around the input."""
    user_path = spec["output_dir"]
    try:
        final = media.output_dir(user_path, overwrite=spec.get("overwrite", False))
    except paths.UnsafePath as exc:
        return [exc.message]
    problems = []
    if media.holds_file(final, MASTER) is False:
        problems.append(_not_a_ladder(user_path))
    try:
        source = media.input_file(spec["input"])
    except (paths.UnsafePath, KeyError):
        source = None  # reported on the input field
    if source is not None and contains(final, source):
        problems.append("the input must not be inside output_dir")
    return problems


_check_input = field_check(inputs=("input",))


def check(root: Media | Path, spec: dict, **context) -> dict[str, list[str]]:
    """Submit-time path checks of the input and ``output_dir``; field → messages."""
    media = media_of(root)
    errors = _check_input(media, spec, **context)
    problems = output_dir_problems(media, spec)
    if problems:
        errors["output_dir"] = problems
    return errors


# -- the request --------------------------------------------------------------------


class HlsRequestSchema(JobCommonSchema):
    input = RelativePath(required=True)
    output_dir = RelativePath(required=True)
    renditions = fields.List(
        fields.Integer(validate=[validate.Range(144, 4320), even]),
        load_default=lambda: list(DEFAULT_RENDITIONS), validate=validate.Length(min=1, max=8),
    )
    segment_s = fields.Float(load_default=DEFAULT_SEGMENT_S, validate=validate.Range(min=1, max=60))

    @validates_schema
    def _no_pattern(self, data, **_):
        if "%" in data["output_dir"]:
            raise ValidationError("must not contain '%' (ffmpeg's HLS muxer reads it as a pattern)", "output_dir")


# -- the planner --------------------------------------------------------------------


def plan_job(ctx: RunContext) -> Plan:
    spec = ctx.spec
    source = ctx.input(spec["input"])
    probe = ctx.probe(source)
    video = main_stream(probe, "video")
    if video is None:
        raise PlanError("invalid_input", "the input has no video stream")
    has_audio = main_stream(probe, "audio") is not None
    _, source_height = display_size(video)
    heights, dropped = ladder(list(spec.get("renditions") or DEFAULT_RENDITIONS), source_height)
    segment_s = float(spec.get("segment_s") or DEFAULT_SEGMENT_S)

    out = ctx.output_dir(spec["output_dir"], entry=MASTER, formats=PLAYLIST_FORMATS)
    problem = replace_problem(out.final, spec["output_dir"])
    if problem:
        raise PlanError("output_exists", problem)
    if contains(out.final, source):
        raise PlanError("invalid_request", "the input must not be inside output_dir")
    if "%" in str(out.temp):
        # ffmpeg expands %v and %d in HLS file names; the directory must not contain '%'.
        raise PlanError("invalid_request", "output_dir must not contain '%'")

    args = ladder_args(source, out.temp, heights, has_audio=has_audio, segment_s=segment_s)
    rate = frame_rate(video)

    def finish() -> dict:
        playlists = write_master(out.temp, heights, frame_rate=float(rate) if rate else None)
        prefix = spec["output_dir"].rstrip("/")
        for playlist in playlists:
            playlist["path"] = f"{prefix}/{playlist['path']}"
        return {"master_playlist": f"{prefix}/{MASTER}", "playlists": playlists}

    result = {"renditions": heights, "renditions_dropped": dropped, "segment_s": segment_s}
    return Plan(args=args, duration_s=media.duration_of(probe), result=result, finish=finish)


def ladder_args(source: Path, directory: Path, heights: list[int], *, has_audio: bool, segment_s: float) -> list[str]:
    """One ffmpeg run: decode once, scale to every height (aspect kept, square pixels), segment."""
    scale = "scale=w=trunc(oh*dar/2)*2:h={},setsar=1"
    if len(heights) == 1:
        graph = f"[0:v:0]{scale.format(heights[0])}[v0]"
    else:
        splits = "".join(f"[s{i}]" for i in range(len(heights)))
        graph = ";".join([f"[0:v:0]split={len(heights)}{splits}",
                          *(f"[s{i}]{scale.format(h)}[v{i}]" for i, h in enumerate(heights))])
    args = input_args(source) + ["-filter_complex", graph]
    streams = []
    for i, height in enumerate(heights):
        args += ["-map", f"[v{i}]"]
        if has_audio:
            args += ["-map", "0:a:0"]
        streams.append(f"v:{i},a:{i},name:{rendition_name(height)}" if has_audio
                       else f"v:{i},name:{rendition_name(height)}")
    args += ["-c:v", "libx264", "-preset", "veryfast", "-crf", str(CRF), "-pix_fmt", "yuv420p"]
    for i, height in enumerate(heights):
        rate = maxrate_kbps(height)
        args += [f"-maxrate:v:{i}", f"{rate}k", f"-bufsize:v:{i}", f"{2 * rate}k"]
    if has_audio:
        args += ["-c:a", "aac", "-b:a", AUDIO_BITRATE, "-ac", "2", "-ar", "48000"]
    args += [
        "-force_key_frames", f"expr:gte(t,n_forced*{segment_s:g})",
        "-f", "hls", "-hls_time", f"{segment_s:g}", "-hls_playlist_type", "vod", "-hls_list_size", "0",
        "-hls_flags", "independent_segments", "-hls_segment_type", "mpegts",
        "-master_pl_name", MASTER, "-var_stream_map", " ".join(streams),
        "-hls_segment_filename", str(directory / "%v_%05d.ts"), "-y", str(directory / "%v.m3u8"),
    ]
    return args


# -- the master playlist -------------------------------------------------------------

_ATTRIBUTE = re.compile(r'([A-Z0-9-]+)=("[^"]*"|[^,]*)')


def parse_master(text: str) -> tuple[int, dict[str, dict[str, str]]]:
    """(EXT-X-VERSION, playlist URI → its EXT-X-STREAM-INF attributes)."""
    version, variants, pending = 3, {}, None
    for line in (line.strip() for line in text.splitlines()):
        if line.startswith("#EXT-X-VERSION:"):
            version = int(line.split(":", 1)[1] or 3)
        elif line.startswith("#EXT-X-STREAM-INF:"):
            pending = {k: v.strip('"') for k, v in _ATTRIBUTE.findall(line.split(":", 1)[1])}
        elif line and not line.startswith("#") and pending is not None:
            variants[line], pending = pending, None
    return version, variants


def parse_media_playlist(text: str) -> list[tuple[float, str]]:
    """(duration, URI) of every segment."""
    segments, duration = [], None
    for line in (line.strip() for line in text.splitlines()):
        if line.startswith("#EXTINF:"):
            duration = float(line.split(":", 1)[1].split(",", 1)[0])
        elif line and not line.startswith("#") and duration is not None:
            segments.append((duration, line))
            duration = None
    return segments


def measure(directory: Path, playlist: str) -> dict:
    """Peak and average bit rate of a rendition's segments (the BANDWIDTH rules of RFC 8216)."""
    segments = parse_media_playlist((directory / playlist).read_text())
    if not segments:
        raise PlanError("ffmpeg_failed", f"ffmpeg wrote no segments for {playlist}")
    sizes = [(directory / uri).stat().st_size for _, uri in segments]
    seconds = sum(duration for duration, _ in segments)
    peak = max(size * 8 / duration for size, (duration, _) in zip(sizes, segments) if duration > 0)
    return {
        "bandwidth": int(math.ceil(peak)),
        "average_bandwidth": int(math.ceil(sum(sizes) * 8 / seconds)) if seconds else None,
        "segments": len(segments),
        "size_bytes": sum(sizes) + (directory / playlist).stat().st_size,
        "duration_s": round(seconds, 3),
    }


def codecs_of(directory: Path, playlist: str) -> str | None:
    """RFC 6381 codec names of a rendition, read back with ffprobe."""
    try:
        probe = process.ffprobe(str(directory / playlist), timeout_s=30.0, formats=PLAYLIST_FORMATS)
    except process.ProbeFailed:
        return None
    names = []
    video, audio = main_stream(probe, "video"), main_stream(probe, "audio")
    if video is not None:
        profile, level = _AVC_PROFILES.get(video.get("profile") or ""), video.get("level")
        if video.get("codec_name") != "h264" or profile is None or not isinstance(level, int) or level <= 0:
            return None
        names.append(f"avc1.{profile}{level:02X}")
    if audio is not None:
        name = _AAC_PROFILES.get(audio.get("profile") or "")
        if audio.get("codec_name") != "aac" or name is None:
            return None
        names.append(name)
    return ",".join(names)


def write_master(directory: Path, heights: list[int], *, frame_rate: float | None) -> list[dict]:
    """Rewrite ffmpeg's master playlist with measured BANDWIDTH/AVERAGE-BANDWIDTH; the renditions."""
    version, variants = parse_master((directory / MASTER).read_text())
    lines = ["#EXTM3U", f"#EXT-X-VERSION:{version}", "#EXT-X-INDEPENDENT-SEGMENTS"]
    playlists = []
    for height in heights:
        uri = f"{rendition_name(height)}.m3u8"
        attributes = variants.get(uri, {})
        resolution = attributes.get("RESOLUTION")
        codecs = (attributes.get("CODECS") or codecs_of(directory, uri)) if resolution else None
        if not codecs:
            raise PlanError("ffmpeg_failed", f"ffmpeg's master playlist lacks the {uri} rendition")
        measured = measure(directory, uri)
        info = [f"BANDWIDTH={measured['bandwidth']}"]
        if measured["average_bandwidth"]:
            info.append(f"AVERAGE-BANDWIDTH={measured['average_bandwidth']}")
        info.append(f"RESOLUTION={resolution}")
        if frame_rate:
            info.append(f"FRAME-RATE={frame_rate:.3f}")
        info.append(f'CODECS="{codecs}"')
        lines += ["#EXT-X-STREAM-INF:" + ",".join(info), uri]
        width, _, shown_height = resolution.partition("x")
        playlists.append({"path": uri, "width": int(width), "height": int(shown_height), "codecs": codecs,
                          **measured})
    (directory / MASTER).write_text("\n".join(lines) + "\n")
    return playlists


KIND = Kind(NAME, HlsRequestSchema, check, plan_job)
