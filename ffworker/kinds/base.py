"""What every job kind is made of: a request schema, a submit-time path check and a planner.

A kind's *planner* turns a job's validated request into a ``Plan`` (ffmpeg
arguments, media duration, result fields) through a ``RunContext``, which
resolves and confines paths, probes inputs and hands out temporary output
names. The worker (``ffworker.worker``) runs every plan through the same
machinery and publishes. A kind's *check* confines the paths a request names
at submit time, so the API refuses with 422 what the worker would refuse.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Callable, Mapping, Protocol

from marshmallow import Schema

from ffworker import fetch, paths, urlguard

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


def input_args(source: Path) -> list[str]:
    """``-i`` for a tenant's file, restricted to self-contained media formats."""
    return ["-format_whitelist", INPUT_FORMATS, "-i", str(source)]


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


class Media(Protocol):
    """The tenant's media store as a submit-time check sees it (``storage.LocalStore``,
    ``storage.S3Store``). Each method applies the job path rules of ``paths.py`` with their
    messages (raising ``paths.UnsafePath``) to what exists in the store, and returns what
    identifies the file, to compare inputs with outputs (``contains`` works on it too)."""

    def input_file(self, user_path: str) -> PurePath: ...

    def output_file(self, user_path: str, *, overwrite: bool, suffixes: frozenset[str] | None = None) -> PurePath: ...

    def output_dir(self, user_path: str, *, overwrite: bool) -> PurePath: ...

    def holds_file(self, directory: PurePath, name: str) -> bool | None:
        """Whether the directory ``output_dir`` returned holds the file ``name``; None: no such directory."""


def media_of(media: "Media | Path") -> Media:
    """A store as is; a directory as the local store of that directory (the tenant's media root)."""
    if isinstance(media, (str, os.PathLike)):
        from ffworker import storage  # here: storage imports outputs, which imports this module

        return storage.LocalStore(Path(media))
    return media


# Submit time: (the tenant's media store, or its local directory; the validated spec) → field
# → messages. Called with ``urls=`` the server's UrlPolicy (ffworker.fetch): what an input
# field may hold as a URL.
PathCheck = Callable[..., dict[str, list[str]]]


def always_available(settings: object) -> str | None:
    return None


@dataclass(frozen=True)
class Kind:
    """One job kind, as the API, the worker and the CLI see it."""

    name: str
    schema: type[Schema]              # the request body, common fields included (ffworker.kinds.request)
    check: PathCheck                  # submit-time path confinement; the planner confines again
    plan: Planner
    # Why this server refuses the kind (from its settings), or None: refused with 422 at submit.
    unavailable: Callable[[object], str | None] = always_available


def field_check(inputs: tuple[str, ...] = (),
                outputs: Mapping[str, frozenset[str] | None] | None = None) -> PathCheck:
    """A check of the request fields that name input files (a path or a list of paths) and
    output files (with their allowed suffixes). Messages mention only the caller's own paths."""
    outputs = dict(outputs or {})

    def check(root: Media | Path, spec: dict, *, urls: fetch.UrlPolicy = fetch.UrlPolicy()) -> dict[str, list[str]]:
        media = media_of(root)
        overwrite = spec.get("overwrite", False)
        errors: dict[str, list[str]] = {}
        resolved_inputs = set()
        for name in inputs:
            values = spec.get(name)
            for value in values if isinstance(values, list) else [values]:
                if fetch.is_url(value):
                    try:
                        urls.check(value)
                    except urlguard.BlockedURL as exc:
                        errors.setdefault(name, []).append(f"{value[:80]!r} {exc}")
                    continue
                try:
                    resolved_inputs.add(media.input_file(value))
                except paths.UnsafePath as exc:
                    errors.setdefault(name, []).append(exc.message)
        for name, suffixes in outputs.items():
            try:
                target = media.output_file(spec[name], overwrite=overwrite, suffixes=suffixes)
            except paths.UnsafePath as exc:
                errors.setdefault(name, []).append(exc.message)
                continue
            if target in resolved_inputs:
                errors.setdefault(name, []).append("the output must not be one of the inputs")
        return errors

    return check
