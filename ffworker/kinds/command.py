"""command: an operator-approved raw ffmpeg argv, run confined like every other job.

The argv is checked against an allow-list, never a deny-list: every option
must be one ffworker knows (with its arity, where it may appear and what its
value may be), so whatever ffmpeg grows next stays refused until someone
reads it. What the allow-list admits cannot name a file except through:

- ``-i PATH`` (inputs) and ``-attach PATH`` — confined like any input path,
  opened with ``-format_whitelist`` (self-contained media formats only);
- the output files (the arguments that are not options or option values) —
  confined like any output path, with an allowed suffix, written to a
  temporary name and moved into place on success;
- filter graphs (``-vf``, ``-af``, ``-filter``, ``-filter_complex``,
  ``-lavfi``, and ``-f lavfi -i GRAPH``) — parsed the way libavfilter parses
  them, and made only of filters from an allow-list that have no option
  reading or writing files or loading code.

``parse`` needs no filesystem; ``check`` parses and confines the paths against
the tenant's directory at submit time; ``plan_job`` repeats both on the worker
and builds the argv ffmpeg gets. The kind runs only where an operator turned
it on (``unavailable``), checked by the API at submit and by the worker again, and
never with object storage (``FFWORKER_STORAGE_URL``): an argv names its files among other
arguments, which a worker could not fetch to its scratch directory and upload.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from marshmallow import fields, validate

from ffworker import paths
from ffworker.kinds.base import INPUT_FORMATS, Kind, Media, Plan, PlanError, RunContext, media_of
from ffworker.kinds.request import JobCommonSchema

NAME = "command"
SETTING = "FFWORKER_ALLOW_RAW_COMMANDS"
DISABLED_MESSAGE = (f"the command kind (raw ffmpeg arguments) is disabled on this server; "
                    f"an operator enables it with {SETTING}=1")
OBJECT_STORAGE_MESSAGE = ("the command kind (raw ffmpeg arguments) is not available with object storage "
                          "(FFWORKER_STORAGE_URL): the files an argv names cannot be fetched and uploaded")
MAX_ARGS = 500
MAX_ARG_CHARS = 8192

GLOBAL, INPUT, OUTPUT = "global", "input", "output"

OUTPUT_SUFFIXES = frozenset({
    ".mp4", ".m4v", ".m4a", ".mov", ".mkv", ".mka", ".webm", ".ts", ".mp3", ".aac", ".wav", ".flac",
    ".ogg", ".oga", ".opus", ".gif", ".png", ".jpg", ".jpeg", ".webp", ".srt", ".vtt", ".ass",
})
INPUT_FORMAT_NAMES = frozenset(INPUT_FORMATS.split(",")) | {"mp4", "m4a", "3gp", "lavfi"}
# Muxers that write exactly the one file they are given (no segments, no
# playlists, no nested outputs, no network).
OUTPUT_MUXERS = frozenset({
    "mp4", "mov", "ipod", "matroska", "webm", "mpegts", "mp3", "adts", "wav", "flac", "ogg", "opus",
    "gif", "image2", "webp", "apng", "srt", "webvtt", "ass",
})
BITSTREAM_FILTERS = frozenset({
    "aac_adtstoasc", "h264_mp4toannexb", "hevc_mp4toannexb", "extract_extradata", "dump_extra",
    "remove_extra", "vp9_superframe", "null", "chomp",
})

# Filters with no option that names a file, a device, a library or a socket,
# checked option by option against this ffmpeg (string-typed options are only
# expressions, colours and layouts). Left out on purpose, among others:
# movie/amovie (open any file or URL), sendcmd/asendcmd (read a command file),
# zmq/azmq (listen on a socket), ladspa/lv2/frei0r (load shared libraries),
# drawtext (fontfile=, textfile=), subtitles/ass (filename=, fontsdir=),
# curves (psfile=), lut1d/lut3d (file=), metadata/ametadata (file=),
# signature, psnr, ssim, vidstabdetect, deshake (write stats files), arnndn,
# sr, dnn_* (load models), cover_rect/find_rect/removelogo (read images).
FILTERS = frozenset({
    # video
    "scale", "crop", "pad", "fps", "framerate", "format", "setsar", "setdar", "setpts", "settb", "trim",
    "concat", "overlay", "split", "hflip", "vflip", "transpose", "rotate", "drawbox", "drawgrid", "boxblur",
    "gblur", "avgblur", "unsharp", "eq", "hue", "colorchannelmixer", "colorbalance", "colorlevels",
    "colorspace", "fade", "xfade", "hstack", "vstack", "xstack", "tpad", "select", "showinfo", "palettegen",
    "paletteuse", "yadif", "bwdif", "setparams", "setrange", "zscale", "lut", "lutrgb", "lutyuv", "negate",
    "chromakey", "colorkey", "reverse", "tile", "thumbnail", "loop", "framestep", "deband", "hqdn3d",
    "nlmeans", "noise", "vignette", "edgedetect", "cropdetect", "blackdetect", "blackframe", "minterpolate",
    "tblend", "blend", "geq", "null", "copy", "setfield", "fieldorder", "scale2ref", "alphamerge",
    "alphaextract", "extractplanes", "deflicker", "removegrain", "smartblur", "cas", "fillborders",
    "histogram", "waveform", "vectorscope", "lenscorrection", "perspective", "xbr", "hqx", "interlace",
    "kerndeint", "mpdecimate", "decimate", "pullup", "telecine", "shuffleframes",
    # video sources
    "color", "testsrc", "testsrc2", "smptebars", "smptehdbars", "nullsrc", "rgbtestsrc", "yuvtestsrc",
    "pal75bars", "pal100bars",
    # audio
    "aresample", "aformat", "anull", "acopy", "volume", "loudnorm", "dynaudnorm", "amix", "amerge", "asplit",
    "atrim", "asetpts", "asettb", "apad", "afade", "acrossfade", "atempo", "areverse", "pan", "channelsplit",
    "channelmap", "join", "highpass", "lowpass", "bandpass", "equalizer", "bass", "treble", "compand",
    "acompressor", "alimiter", "silenceremove", "silencedetect", "volumedetect", "ebur128", "aloop", "aecho",
    "adelay", "asetrate", "aselect", "chorus", "flanger", "stereotools", "extrastereo", "afftdn", "anlmdn",
    "showwaves", "showspectrum", "showwavespic", "showspectrumpic",
    # audio sources
    "anullsrc", "sine", "aevalsrc",
})
# Filters allowed only with these named options (no positional values): the
# others include one that writes a file (paletteuse's debug_kdtree=).
FILTER_OPTIONS = {
    "paletteuse": frozenset({"dither", "bayer_scale", "diff_mode", "new", "alpha_threshold", "use_alpha",
                             "color_search", "mean_err"}),
}

# Refused options whose reason deserves a sentence (everything not in OPTIONS is refused anyway).
_WRITES = "it writes a file of its own choosing, outside the job's outputs"
_ENCODER_FILES = "it passes encoder options that read or write files (stats=, qpfile=, dump-yuv=, csv=, …)"
_SET_BY_FFWORKER = "ffworker sets it itself"
_DEVICES = "it opens hardware devices"
REFUSED = {
    "filter_script": "it reads a filter graph from a file",
    "filter_complex_script": "it reads a filter graph from a file",
    "dump_attachment": "it writes attachments to files named by the input",
    "pass": "two-pass encoding writes its statistics file outside the media directory",
    "passlogfile": _WRITES, "report": _WRITES, "vstats": _WRITES, "vstats_file": _WRITES, "sdp_file": _WRITES,
    "stats_enc_pre": _WRITES, "stats_enc_post": _WRITES, "stats_mux_pre": _WRITES,
    "progress": "it writes progress to a file or URL (ffworker reads ffmpeg's progress itself)",
    "x264-params": _ENCODER_FILES, "x264opts": _ENCODER_FILES, "x265-params": _ENCODER_FILES,
    "svtav1-params": _ENCODER_FILES, "aom-params": _ENCODER_FILES,
    "protocol_whitelist": _SET_BY_FFWORKER, "protocol_blacklist": _SET_BY_FFWORKER,
    "format_whitelist": _SET_BY_FFWORKER, "loglevel": _SET_BY_FFWORKER, "v": _SET_BY_FFWORKER,
    "safe": "it belongs to the concat demuxer, which is not allowed (use the concat job kind)",
    "pattern_type": "it lets image inputs expand glob patterns",
    "init_hw_device": _DEVICES, "hwaccel": _DEVICES, "hwaccel_device": _DEVICES, "filter_hw_device": _DEVICES,
}
# Accepted and left out of the argv: ffworker sets them itself.
DROPPED = frozenset({"y", "n", "hide_banner", "nostdin", "nostats", "stats"})


class CommandRefused(ValueError):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# -- values ----------------------------------------------------------------------------

Check = Callable[[str, str], str | None]   # (value, where) → reason to refuse, or None

_PLAIN = re.compile(r"[\w.:+\-/*,=()]{1,128}")
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_INTEGER = re.compile(r"-?\d{1,12}")
_MAP = re.compile(r"-?(\[[\w.:\-]{1,64}\]|\d{1,4}(:[\w#.:=\-]{0,64})?)\??")
_MAP_METADATA = re.compile(r"-?\d{1,4}(:[\w.:\-]{0,64})?")
_STREAM_SPECIFIER = re.compile(r"[\w#.:=\-]{1,64}")
_KEY_FRAMES = re.compile(r"[\w.:+\-/*,()<>=! ]{1,256}")


def _pattern(regex: re.Pattern, what: str) -> Check:
    def check(value: str, where: str) -> str | None:
        return None if regex.fullmatch(value) else f"must be {what}"
    return check


_plain = _pattern(_PLAIN, "a plain value (letters, digits and . : + - / * , = ( ))")
_name = _pattern(_NAME, "a name (letters, digits, '.', '_' or '-')")
_integer = _pattern(_INTEGER, "an integer")
_map = _pattern(_MAP, "a stream map like 0:v:0, 1:a? or [label]")
_map_metadata = _pattern(_MAP_METADATA, "an input index with an optional specifier, like 0 or -1")
_key_frames = _pattern(_KEY_FRAMES, "times or an expr: expression")


def _text(value: str, where: str) -> str | None:
    return None  # free text (metadata, titles): never a path, never parsed for options


def _format(value: str, where: str) -> str | None:
    allowed = INPUT_FORMAT_NAMES if where == INPUT else OUTPUT_MUXERS
    if value in allowed:
        return None
    return f"format {value!r} is not allowed for an {where}; allowed: {', '.join(sorted(allowed))}"


def _bitstream_filters(value: str, where: str) -> str | None:
    unknown = [name for name in value.split(",") if name not in BITSTREAM_FILTERS]
    if unknown:
        return f"bitstream filter {unknown[0]!r} is not allowed; allowed: {', '.join(sorted(BITSTREAM_FILTERS))}"
    return None


def _graph(value: str, where: str) -> str | None:
    try:
        check_filtergraph(value)
    except CommandRefused as exc:
        return exc.message
    return None


@dataclass(frozen=True)
class Option:
    value: Check | None            # None: a flag without a value
    where: frozenset[str]
    per_stream: bool = False       # accepts a stream specifier (-c:v, -b:a:0)


def _options() -> dict[str, Option]:
    g, i, o, io = frozenset({GLOBAL}), frozenset({INPUT}), frozenset({OUTPUT}), frozenset({INPUT, OUTPUT})
    table: dict[str, Option] = {}

    def add(names: str, value: Check | None, where: frozenset[str], per_stream: bool = False) -> None:
        for name in names.split():
            table[name] = Option(value, where, per_stream)

    add("filter_complex lavfi", _graph, g)
    add("filter_threads filter_complex_threads", _integer, g)
    add("vsync max_error_rate", _plain, g)
    add("copyts start_at_zero xerror", None, g)
    add("f", _format, io)
    add("ss t to threads fflags", _plain, io)
    add("c codec", _name, io, per_stream=True)
    add("vcodec acodec scodec", _name, io)
    add("r s pix_fmt ar ac channel_layout ch_layout", _plain, io, per_stream=True)
    add("an vn sn dn", None, io)
    add("sseof itsoffset framerate video_size readrate err_detect", _plain, i)
    add("itsscale", _plain, i, per_stream=True)
    add("discard", _name, i, per_stream=True)
    add("stream_loop thread_queue_size loop probesize analyzeduration guess_layout_max ignore_editlist", _integer, i)
    add("re autorotate noautorotate accurate_seek noaccurate_seek", None, i)
    add("b maxrate minrate bufsize crf qp qmin qmax g keyint_min bf refs sc_threshold q qscale global_quality "
        "fpsmax aspect disposition deadline cpu-used row-mt tile-columns frame-parallel lag-in-frames "
        "auto-alt-ref aq-mode compression_level vbr application cutoff strict flags", _plain, o, per_stream=True)
    add("ab vb fs movflags avoid_negative_ts max_interleave_delta muxdelay muxpreload timecode frag_duration "
        "min_frag_duration", _plain, o)
    add("preset tune profile level fps_mode sample_fmt tag color_primaries color_trc colorspace color_range",
        _name, o, per_stream=True)
    add("vtag atag brand", _name, o)
    add("vf af", _graph, o)
    add("filter", _graph, o, per_stream=True)
    add("frames max_muxing_queue_size", _integer, o, per_stream=True)
    add("vframes aframes map_chapters update", _integer, o)
    add("map", _map, o)
    add("map_metadata", _map_metadata, o, per_stream=True)
    add("metadata", _text, o, per_stream=True)
    add("bsf", _bitstream_filters, o, per_stream=True)
    add("force_key_frames", _key_frames, o, per_stream=True)
    add("shortest", None, o)
    add("attach", _text, o)       # a path: confined like an input
    return table


OPTIONS = _options()


# -- the argv ---------------------------------------------------------------------------


@dataclass
class Command:
    """A parsed argv: ``items`` in order, each ("option", token, value|None), ("input", path),
    ("graph_input", graph), ("attach", path) or ("output", path)."""

    items: list[tuple] = field(default_factory=list)

    def paths(self, role: str) -> list[str]:
        return [item[1] for item in self.items if item[0] == role]


def parse(args: list[str]) -> Command:
    """Check an argv without touching the filesystem; CommandRefused names the first problem."""
    if not isinstance(args, list) or not args:
        raise CommandRefused("args must be a non-empty list of strings")
    if len(args) > MAX_ARGS:
        raise CommandRefused(f"args may hold at most {MAX_ARGS} arguments")
    for arg in args:
        if not isinstance(arg, str):
            raise CommandRefused("every argument must be a string")
        if "\x00" in arg:
            raise CommandRefused("an argument contains a NUL character")
        if len(arg) > MAX_ARG_CHARS:
            raise CommandRefused(f"an argument is longer than {MAX_ARG_CHARS} characters")
    command = Command()
    pending: list[tuple[str, str, str | None, Option]] = []   # options of the next input or output
    index = 0
    while index < len(args):
        token = args[index]
        if token == "-":
            raise CommandRefused("'-' (standard input or output) is not allowed; name a file")
        if token.startswith("-"):
            name, _, specifier = token[1:].partition(":")
            if name in DROPPED and not specifier:
                index += 1
                continue
            if name == "i" and not specifier:
                value = _value_of(args, index, token)
                _bind(pending, INPUT, command)
                if _last_format(command.items) == "lavfi":
                    problem = _graph(value, INPUT)
                    if problem:
                        raise CommandRefused(f"-f lavfi -i: {problem}")
                    command.items.append(("graph_input", value))
                else:
                    _check_path(value, "input")
                    command.items.append(("input", value))
                index += 2
                continue
            option = OPTIONS.get(name)
            if option is None:
                raise CommandRefused(_refusal(token, name))
            if specifier and not option.per_stream:
                raise CommandRefused(f"option {token!r}: -{name} takes no stream specifier")
            if specifier and not _STREAM_SPECIFIER.fullmatch(specifier):
                raise CommandRefused(f"option {token!r}: invalid stream specifier")
            value = None
            if option.value is not None:
                value = _value_of(args, index, token)
            if option.where == {GLOBAL}:
                _check_value(token, value, option, GLOBAL)
                command.items.append(("option", token, value))
            else:
                pending.append((name, token, value, option))
            index += 1 if option.value is None else 2
            continue
        _bind(pending, OUTPUT, command)
        _check_path(token, "output")
        suffix = Path(token).suffix.lower()
        if suffix not in OUTPUT_SUFFIXES:
            raise CommandRefused(f"output {token!r} must end in one of: {', '.join(sorted(OUTPUT_SUFFIXES))}")
        if "%" in token:
            raise CommandRefused(f"output {token!r}: '%' would make ffmpeg write a numbered sequence of files")
        command.items.append(("output", token))
        index += 1
    if pending:
        names = ", ".join(token for _, token, _, _ in pending)
        raise CommandRefused(f"options after the last output apply to nothing: {names}")
    outputs = command.paths("output")
    if not outputs:
        raise CommandRefused("args name no output file (the last argument must be the output path)")
    if len(set(outputs)) != len(outputs):
        raise CommandRefused("an output file is named twice")
    if set(outputs) & set(command.paths("input")):
        raise CommandRefused("an output must not be one of the inputs")
    return command


def _value_of(args: list[str], index: int, token: str) -> str:
    if index + 1 >= len(args):
        raise CommandRefused(f"option {token!r} needs a value")
    return args[index + 1]


def _bind(pending: list, where: str, command: Command) -> None:
    """Attach the pending options to the input or output they precede."""
    for name, token, value, option in pending:
        if where not in option.where:
            raise CommandRefused(f"option {token!r} is not allowed before an {where}")
        _check_value(token, value, option, where)
        if name == "attach":
            _check_path(value, "attachment")
            command.items.append(("attach", value))
        else:
            command.items.append(("option", token, value))
    pending.clear()


def _check_value(token: str, value: str | None, option: Option, where: str) -> None:
    if option.value is None:
        return
    problem = option.value(value, where)
    if problem:
        raise CommandRefused(f"option {token!r}: {problem}")


def _last_format(items: list[tuple]) -> str | None:
    """The -f given to the input being bound (among the options since the previous file)."""
    for item in reversed(items):
        if item[0] != "option":
            return None
        if item[1] == "-f":
            return item[2]
    return None


def _check_path(value: str, role: str) -> None:
    try:
        paths.check_user_path(value)
    except paths.UnsafePath as exc:
        raise CommandRefused(f"{role} path: {exc.message}") from None


def _refusal(token: str, name: str) -> str:
    if name.startswith("/"):
        return f"option {token!r} is not allowed: it loads the option's value from a file"
    reason = REFUSED.get(name)
    if reason:
        return f"option {token!r} is not allowed: {reason}"
    return f"option {token!r} is not allowed (ffworker accepts only the ffmpeg options it knows to be safe)"


# -- filter graphs ----------------------------------------------------------------------

_WHITESPACE = " \n\t\r"
_FILTER_NAME = re.compile(r"[A-Za-z0-9_]+(@[A-Za-z0-9_.\-]+)?")


def get_token(text: str, index: int, terminators: str) -> tuple[str, int]:
    """libavutil's av_get_token: up to an unquoted, unescaped terminator; '…' quotes, \\ escapes."""
    while index < len(text) and text[index] in _WHITESPACE:
        index += 1
    out: list[str] = []
    end = 0
    while index < len(text) and text[index] not in terminators:
        char = text[index]
        index += 1
        if char == "\\" and index < len(text):
            out.append(text[index])
            index += 1
            end = len(out)
        elif char == "'":
            while index < len(text) and text[index] != "'":
                out.append(text[index])
                index += 1
            if index < len(text):
                index += 1
                end = len(out)
        else:
            out.append(char)
    while len(out) > end and out[-1] in _WHITESPACE:
        out.pop()
    return "".join(out), index


def _skip_space(text: str, index: int) -> int:
    while index < len(text) and text[index] in _WHITESPACE:
        index += 1
    return index


def _skip_labels(text: str, index: int) -> int:
    while index < len(text) and text[index] == "[":
        _, index = get_token(text, index + 1, "]")
        if index >= len(text) or text[index] != "]":
            raise CommandRefused("filter graph: unmatched '['")
        index = _skip_space(text, index + 1)
    return index


def parse_filtergraph(text: str) -> list[tuple[str, str | None]]:
    """(filter name, its arguments unescaped once) for every filter, as libavfilter splits the graph."""
    index = _skip_space(text, 0)
    if text.startswith("sws_flags=", index):
        _, index = get_token(text, index + len("sws_flags="), ";")
        index += 1 if index < len(text) else 0
    filters = []
    while True:
        index = _skip_labels(text, _skip_space(text, index))
        start = index
        name, index = get_token(text, index, "=,;[")
        raw_name = text[start:index].strip(_WHITESPACE)
        if not _FILTER_NAME.fullmatch(raw_name):
            shown = raw_name if len(raw_name) <= 40 else raw_name[:40] + "…"
            raise CommandRefused(f"filter graph: {shown!r} is not a plain filter name")
        arguments = None
        if index < len(text) and text[index] == "=":
            arguments, index = get_token(text, index + 1, "[],;")
        filters.append((name.split("@", 1)[0], arguments))
        index = _skip_space(text, _skip_labels(text, index))
        if index >= len(text):
            return filters
        if text[index] not in ",;":
            raise CommandRefused(f"filter graph: cannot parse it near {text[index:index + 20]!r}")
        index += 1


def _is_key_char(char: str) -> bool:
    return char.isascii() and (char.isalnum() or char in "-_/.")


def filter_options(arguments: str) -> list[tuple[str | None, str]]:
    """(key or None for a positional value, value), as av_opt_get_key_value splits filter arguments."""
    options = []
    index = 0
    while index < len(arguments):
        start = _skip_space(arguments, index)
        end = start
        while end < len(arguments) and _is_key_char(arguments[end]):
            end += 1
        after = _skip_space(arguments, end)
        key = None
        if after < len(arguments) and arguments[after] == "=":
            key, index = arguments[start:end], after + 1
        value, index = get_token(arguments, index, ":")
        options.append((key, value))
        if index < len(arguments):
            index += 1
    return options


def check_filtergraph(text: str) -> None:
    if not text.strip():
        raise CommandRefused("filter graph is empty")
    for name, arguments in parse_filtergraph(text):
        if name not in FILTERS:
            raise CommandRefused(f"filter {name!r} is not allowed" + (
                ": it reads files or URLs" if name in ("movie", "amovie") else
                " (ffworker accepts only filters that cannot read or write files)"))
        options = filter_options(arguments) if arguments else []
        for key, _ in options:
            if key is not None and (not key or "/" in key):
                raise CommandRefused(f"filter {name!r}: option {key!r} is not allowed (it would load a file)")
        allowed = FILTER_OPTIONS.get(name)
        if allowed is not None:
            for key, _ in options:
                if key is None or key not in allowed:
                    raise CommandRefused(f"filter {name!r} takes only these options, by name: "
                                         f"{', '.join(sorted(allowed))}")


# -- submit time and run time -----------------------------------------------------------


class CommandRequestSchema(JobCommonSchema):
    # The argv itself is checked by ``check`` (after the kind is known to be enabled).
    args = fields.List(
        fields.String(validate=validate.Length(max=MAX_ARG_CHARS)),
        required=True, validate=validate.Length(min=1, max=MAX_ARGS),
    )


def unavailable(settings) -> str | None:
    if getattr(settings, "storage_url", None):
        return OBJECT_STORAGE_MESSAGE
    return None if getattr(settings, "allow_raw_commands", False) else DISABLED_MESSAGE


def check(root: Media | Path, spec: dict, **context) -> dict[str, list[str]]:
    """Parse the argv and confine every path it names; field → messages (only the caller's own paths).

    Raw commands take no URL inputs (``context``'s URL policy is not used): every path is a file."""
    try:
        command = parse(spec.get("args"))
    except CommandRefused as exc:
        return {"args": [exc.message]}
    media = media_of(root)
    errors = []
    inputs = set()
    for role in ("input", "attach"):
        for user_path in command.paths(role):
            try:
                inputs.add(media.input_file(user_path))
            except paths.UnsafePath as exc:
                errors.append(exc.message)
    for user_path in command.paths("output"):
        try:
            target = media.output_file(user_path, overwrite=spec.get("overwrite", False), suffixes=OUTPUT_SUFFIXES)
        except paths.UnsafePath as exc:
            errors.append(exc.message)
            continue
        if target in inputs:
            errors.append(f"output {user_path!r} is also an input")
    return {"args": errors} if errors else {}


def plan_job(ctx: RunContext) -> Plan:
    if not getattr(ctx.settings, "allow_raw_commands", False):
        raise PlanError("command_disabled", f"raw ffmpeg commands are disabled on this worker ({SETTING} is off)")
    if getattr(ctx.settings, "storage_url", None):
        raise PlanError("command_disabled", OBJECT_STORAGE_MESSAGE)
    try:
        command = parse(ctx.spec["args"])
    except CommandRefused as exc:
        raise PlanError("invalid_request", exc.message) from None
    inputs = {ctx.input(user_path) for user_path in command.paths("input") + command.paths("attach")}
    argv = ["-y"]
    for item in command.items:
        role = item[0]
        if role == "option":
            argv += [item[1]] if item[2] is None else [item[1], item[2]]
        elif role == "input":
            argv += ["-format_whitelist", INPUT_FORMATS, "-i", str(ctx.input(item[1]))]
        elif role == "graph_input":
            argv += ["-format_whitelist", "lavfi", "-i", item[1]]
        elif role == "attach":
            argv += ["-attach", str(ctx.input(item[1]))]
        else:
            output = ctx.output(item[1], suffixes=OUTPUT_SUFFIXES)
            if output.final in inputs:
                raise PlanError("invalid_request", f"output {item[1]!r} is also an input")
            argv.append(str(output.temp))
    return Plan(args=argv, duration_s=None, result={})


KIND = Kind(NAME, CommandRequestSchema, check, plan_job, unavailable=unavailable)
