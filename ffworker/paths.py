"""Confine user-supplied paths to a tenant's media directory.

Every path in a request is relative to the tenant directory. Paths are checked
as raw strings first (so nothing is normalised away before it is inspected),
then resolved with symlinks followed and required to land strictly inside the
resolved root. Error messages only ever echo the user's own relative path, so
server layout never leaks into API responses.
"""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path, PurePath
from typing import Callable

TEMP_MARKER = ".ffwtmp."

MAX_PATH_CHARS = 1024
MAX_COMPONENT_BYTES = 255  # NAME_MAX on Linux filesystems
# The longest name a run gives a file beside an output: the in-flight prefix
# ``.ffwtmp.<job uuid>.<attempt>.`` (attempts allowed up to MAX_ATTEMPT_DIGITS
# digits) before the output's own name, and after it the longest suffix a
# scratch name adds (concat's ``.ffconcat`` list, the ``.previous`` name of a
# directory swap without renameat2). An output name that leaves no room for
# these is refused at submit, since the run would fail with ENAMETOOLONG.
MAX_ATTEMPT_DIGITS = 6
SCRATCH_SUFFIX_MAX_BYTES = 16
IN_FLIGHT_EXTRA_BYTES = len(TEMP_MARKER) + 36 + 1 + MAX_ATTEMPT_DIGITS + 1 + SCRATCH_SUFFIX_MAX_BYTES
MAX_OUTPUT_NAME_BYTES = MAX_COMPONENT_BYTES - IN_FLIGHT_EXTRA_BYTES
_SHOWN_CHARS = 80

# ffmpeg treats "<scheme>:" as a protocol (concat:, pipe:, subfile:, ...), and
# "C:" is a drive on the platforms that have them: none of these are files.
_PROTOCOL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")
_JOB_ID = re.compile(r"[A-Za-z0-9_-]+")
_TEMP_NAME = re.compile(re.escape(TEMP_MARKER) + r"([A-Za-z0-9_-]+)\.([0-9]+)\.(.+)", re.DOTALL)


class UnsafePath(ValueError):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def tenant_root(settings, tenant_name: str) -> Path:
    """The tenant's media directory: every path of its requests is relative to it."""
    return Path(os.path.realpath(settings.media_root)) / tenant_name


def confine(root: Path, user_path: str) -> Path:
    _check_raw(user_path)
    shown = _show(user_path)
    real_root = os.path.realpath(root)
    resolved = os.path.realpath(os.path.join(real_root, user_path))
    if resolved == real_root:
        raise UnsafePath(f"{shown} refers to the media directory itself")
    if os.path.commonpath([real_root, resolved]) != real_root:
        raise UnsafePath(f"{shown} points outside the media directory")
    relative = os.path.relpath(resolved, real_root)
    if any(TEMP_MARKER in part for part in relative.split(os.sep)):
        raise UnsafePath(f"{shown} points at a reserved in-flight output name")
    if _contains_symlink_loop(resolved, real_root):
        raise UnsafePath(f"{shown} contains a symlink loop")
    return Path(resolved)


def object_name(user_path: str) -> str:
    """The name ``user_path`` stands for in a store of named objects (a bucket's keys), where
    nothing can be resolved: the checks of ``confine`` that need no filesystem, and the name
    with its empty and '.' components dropped, as resolving drops them (UnsafePath)."""
    _check_raw(user_path)
    parts = [part for part in user_path.split("/") if part not in ("", ".")]
    if not parts:
        raise UnsafePath(f"{_show(user_path)} refers to the media directory itself")
    return "/".join(parts)


def input_path(root: Path, user_path: str) -> Path:
    path = confine(root, user_path)
    check_input_kind(_kind(path, user_path), user_path)
    return path


def output_path(
    root: Path, user_path: str, *, overwrite: bool, suffixes: frozenset[str] | None = None
) -> Path:
    path = confine(root, user_path)
    if suffixes is not None:
        check_suffix(path, user_path, suffixes)
    check_output_kind(_kind(path, user_path), user_path, overwrite=overwrite, parent_is_file=_local_file(root))
    return path


def output_dir_path(root: Path, user_path: str, *, overwrite: bool) -> Path:
    path = confine(root, user_path)
    check_output_dir_kind(_kind(path, user_path), user_path, overwrite=overwrite, parent_is_file=_local_file(root))
    return path


# What exists at a name decides whether it may be an input or an output; the stores
# (storage.py) find out what exists their own way and apply these same rules. A kind is
# 'file', 'dir', 'other', 'not_a_dir' (a directory on the way is a file) or None (nothing).


def check_input_kind(kind: str | None, user_path: str) -> None:
    if kind in (None, "not_a_dir"):
        raise UnsafePath(f"input {_show(user_path)} does not exist")
    if kind != "file":
        raise UnsafePath(f"input {_show(user_path)} is not a regular file")


def check_output_kind(kind: str | None, user_path: str, *, overwrite: bool,
                      parent_is_file: Callable[[str], bool]) -> None:
    """``parent_is_file(prefix)``: whether the leading components ``prefix`` of the name are a file."""
    if kind == "not_a_dir":
        raise UnsafePath(_parent_is_a_file(user_path, parent_is_file))
    if kind == "dir":
        raise UnsafePath(f"output {_show(user_path)} is an existing directory")
    if kind == "other":
        # FIFOs and devices would block or clobber something that is not media.
        raise UnsafePath(f"output {_show(user_path)} exists and is not a regular file")
    if kind == "file" and not overwrite:
        raise UnsafePath(f"output {_show(user_path)} already exists; set overwrite to replace it")


def check_output_dir_kind(kind: str | None, user_path: str, *, overwrite: bool,
                          parent_is_file: Callable[[str], bool]) -> None:
    if kind == "not_a_dir":
        raise UnsafePath(_parent_is_a_file(user_path, parent_is_file))
    if kind in ("file", "other"):
        raise UnsafePath(f"output {_show(user_path)} exists and is not a directory")
    if kind == "dir" and not overwrite:
        raise UnsafePath(f"output {_show(user_path)} already exists; set overwrite to replace it")


def check_output_name(final: PurePath, user_path: str) -> None:
    """Refuse an output whose in-flight or scratch names would exceed NAME_MAX (UnsafePath).

    ``final`` is the confined output path (``output_path``/``output_dir_path``):
    its own name is what the run prefixes and suffixes. Every kind's submit-time
    check calls this for every output it names.
    """
    if len(os.fsencode(final.name)) > MAX_OUTPUT_NAME_BYTES:
        raise UnsafePath(
            f"output {_show(user_path)} has a file name longer than {MAX_OUTPUT_NAME_BYTES} bytes "
            f"(the name it has while the job runs is {IN_FLIGHT_EXTRA_BYTES} bytes longer, "
            f"and a file name may have at most {MAX_COMPONENT_BYTES})"
        )


def temp_path_for(final: Path, job_id: str, attempt: int) -> Path:
    """The in-flight name for `final`; the original name stays last so ffmpeg still infers the format."""
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        raise ValueError(f"job id {job_id!r} must be letters, digits, '_' or '-'")
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 0:
        raise ValueError(f"attempt {attempt!r} must be a non-negative integer")
    return final.with_name(f"{TEMP_MARKER}{job_id}.{attempt}.{final.name}")


def parse_temp_name(name: str) -> tuple[str, int] | None:
    match = _TEMP_NAME.fullmatch(name)
    if match is None:
        return None
    return match.group(1), int(match.group(2))


def check_user_path(user_path: object) -> None:
    """The checks that need no filesystem: type, characters, absolute, '..', protocols, reserved names.

    Raises UnsafePath. ``confine`` runs the same checks before resolving anything.
    """
    _check_raw(user_path)


def _check_raw(user_path: object) -> None:
    if not isinstance(user_path, str):
        raise UnsafePath(f"path must be a string, not {type(user_path).__name__}")
    if not user_path:
        raise UnsafePath("path is empty")
    shown = _show(user_path)
    if len(user_path) > MAX_PATH_CHARS:
        raise UnsafePath(f"{shown} is longer than {MAX_PATH_CHARS} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in user_path):
        raise UnsafePath(f"{shown} contains a control character")
    if not _encodable(user_path):
        raise UnsafePath(f"{shown} is not valid UTF-8")
    if user_path.startswith("/"):
        raise UnsafePath(f"{shown} must be relative to the media directory")
    if user_path.startswith("~"):
        raise UnsafePath(f"{shown} must not start with '~'")
    if _PROTOCOL.match(user_path):
        raise UnsafePath(f"{shown} looks like a URL or protocol, not a file path")
    for component in user_path.split("/"):
        _check_component(component, shown)
    if user_path.strip("/") in (".", ""):
        raise UnsafePath(f"{shown} refers to the media directory itself")


def _check_component(component: str, shown: str) -> None:
    if component == "..":
        raise UnsafePath(f"{shown} must not contain '..'")
    if component.startswith("-"):
        # ffmpeg would parse it as an option.
        raise UnsafePath(f"{shown} has a component starting with '-'")
    if TEMP_MARKER in component:
        raise UnsafePath(f"{shown} uses the reserved name marker {TEMP_MARKER!r}")
    if len(component.encode("utf-8")) > MAX_COMPONENT_BYTES:
        raise UnsafePath(f"{shown} has a component longer than {MAX_COMPONENT_BYTES} bytes")


def check_suffix(path: PurePath, user_path: str, suffixes: frozenset[str]) -> None:
    allowed = {s.lower() if s.startswith(".") else "." + s.lower() for s in suffixes}
    if path.suffix.lower() not in allowed:
        listed = ", ".join(sorted(allowed))
        raise UnsafePath(f"output {_show(user_path)} must end in one of: {listed}")


def _kind(path: Path, user_path: str) -> str | None:
    """'file', 'dir', 'other', 'not_a_dir' (a directory on the way is a file), or None when
    nothing exists there."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return "not_a_dir"
    except OSError:
        raise UnsafePath(f"{_show(user_path)} cannot be accessed") from None
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    return "other"


def _local_file(root: Path) -> Callable[[str], bool]:
    real_root = os.path.realpath(root)

    def is_file(prefix: str) -> bool:
        full = os.path.join(real_root, prefix)
        return os.path.lexists(full) and not os.path.isdir(full)

    return is_file


def _parent_is_a_file(user_path: str, is_file: Callable[[str], bool]) -> str:
    """The message for an output below something that is a file: it names the first such
    component of the caller's own path (the run could only fail with ENOTDIR or EEXIST)."""
    parts = [part for part in user_path.split("/") if part not in ("", ".")]
    for depth in range(1, len(parts)):
        prefix = "/".join(parts[:depth])
        if is_file(prefix):
            return f"output {_show(user_path)}: {_show(prefix)} is a file, not a directory"
    return f"output {_show(user_path)}: a directory on its way is a file"


def _contains_symlink_loop(resolved: str, real_root: str) -> bool:
    # realpath() leaves a link in place only when it loops; every other link is gone.
    current = resolved
    while current != real_root and current != os.path.dirname(current):
        if os.path.islink(current):
            return True
        current = os.path.dirname(current)
    return False


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _show(user_path: str) -> str:
    printable = "".join(c if c.isprintable() else repr(c)[1:-1] for c in user_path)
    if len(printable) > _SHOWN_CHARS:
        printable = printable[:_SHOWN_CHARS] + "..."
    return f"'{printable}'"
