"""Placing a run's outputs: temp names moved into place atomically, or removed.

A run writes every output under an in-flight name beside its target
(``paths.temp_path_for``). On success each one is moved into place in one
step; if one cannot be, those already placed by this run are taken back. On
failure the temp outputs are removed. ``remove`` is the one way a file or a
directory tree is deleted here, and the orphan cleanup's too.
"""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
from pathlib import Path

from ffworker.kinds.base import Output


class OutputExists(Exception):
    """An output cannot be placed: something took its name while the job ran."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def publish(outputs: list[Output], *, overwrite: bool) -> None:
    """Move every output into place; if one cannot be, take back those already placed."""
    placed: list[Output] = []
    try:
        for output in outputs:
            move = publish_dir if output.is_dir else publish_file
            move(output.temp, output.final, overwrite=overwrite, user_path=output.user_path)
            placed.append(output)
    except (OutputExists, OSError):
        if not overwrite:  # what was placed was created by this run: nothing else is lost
            for output in placed:
                remove(output.final)
        raise


def discard(outputs: list[Output]) -> None:
    """Remove the temp outputs of a run that will not publish them."""
    for output in outputs:
        remove(output.temp)


def remove(path: Path) -> None:
    """Remove a file or a directory tree; a missing one is fine, a symlink is removed, not followed."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def size_bytes(path: Path) -> int:
    """A file's size, or the total of the regular files in a directory tree."""
    if not path.is_dir():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def publish_file(temp: Path, final: Path, *, overwrite: bool, user_path: str) -> None:
    """Move a finished temp file into place atomically.

    Without overwrite, a hard link refuses to clobber a file that appeared
    since submission; with it, rename(2) replaces the target in one step.
    """
    if overwrite:
        os.replace(temp, final)
        return
    try:
        os.link(temp, final)
    except FileExistsError:
        raise OutputExists(f"output {user_path!r} appeared while the job ran; set overwrite to replace it")
    temp.unlink()


def publish_dir(temp: Path, final: Path, *, overwrite: bool, user_path: str) -> None:
    """Move a finished temp directory into place atomically.

    Without overwrite the rename refuses to replace anything that appeared
    since submission; with it, an existing directory is swapped with the new
    one in a single step (readers see the old tree or the new one, never a
    mix) and then deleted.
    """
    try:
        _rename(temp, final, _RENAME_NOREPLACE)
        return
    except FileExistsError:
        if not overwrite:
            raise OutputExists(f"output {user_path!r} appeared while the job ran; "
                               "set overwrite to replace it") from None
    if final.is_symlink() or not final.is_dir():
        raise OutputExists(f"output {user_path!r} exists and is not a directory")
    _rename(temp, final, _RENAME_EXCHANGE)
    shutil.rmtree(temp, ignore_errors=True)  # now the previous directory


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def _rename(source: Path, target: Path, flags: int) -> None:
    """renameat2(2); where the C library or the filesystem lacks it, the closest portable steps."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(code, os.strerror(code), str(target))
    if flags == _RENAME_NOREPLACE:
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
        os.rename(source, target)
        return
    aside = source.with_name(source.name + ".previous")
    os.rename(target, aside)
    os.rename(source, target)
    os.rename(aside, source)
