"""A tenant's media store as the files API sees it: put, stat, delete and list files.

The store is the tenant's directory under ``FFWORKER_MEDIA_ROOT``, the same one jobs
read and write, and every name goes through the same confinement jobs use
(``paths.py``): a file the API accepts is a file a job may name, and the other way
round. An upload is written to an in-flight name (``paths.temp_path_for``, so the
orphan cleanup of ``maintenance/prune.py`` also removes what a killed web process
left) and moved into place only once it is complete (``outputs.publish_file``): a
broken upload leaves nothing under the final name.
"""
from __future__ import annotations

import hashlib
import os
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ffworker import outputs, paths

CHUNK_BYTES = 1024 * 1024
# Uploads are not jobs: attempt 0 never belongs to a claim (claims count from 1), so the
# orphan cleanup finds no running owner and removes an abandoned upload once it is idle.
UPLOAD_ATTEMPT = 0


class TooLarge(Exception):
    """The body exceeds the upload limit."""


class Exists(Exception):
    """The file exists and the request asked not to replace it."""


@dataclass(frozen=True)
class Stored:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Entry:
    name: str
    size: int
    mtime: float


class LocalStore:
    """One tenant's directory; raises ``paths.UnsafePath`` for any name jobs could not use."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def put(self, user_path: str, body: BinaryIO, *, max_bytes: int, replace: bool = True) -> Stored:
        """Stream ``body`` to ``user_path`` through an in-flight name, hashing as it goes.

        Raises TooLarge past ``max_bytes`` and Exists when ``replace`` is false and the
        file is there (already, or by the time the upload is complete); in every failure
        the in-flight file is removed.
        """
        final = paths.output_path(self.root, user_path, overwrite=True)
        paths.check_output_name(final, user_path)
        if not replace and os.path.lexists(final):
            raise Exists(user_path)
        final.parent.mkdir(parents=True, exist_ok=True)
        temp = paths.temp_path_for(final, str(uuid.uuid4()), UPLOAD_ATTEMPT)
        digest = hashlib.sha256()
        size = 0
        try:
            with open(temp, "xb") as out:
                while True:
                    chunk = body.read(CHUNK_BYTES)
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > max_bytes:
                        raise TooLarge(user_path)
                    digest.update(chunk)
                    out.write(chunk)
            try:
                outputs.publish_file(temp, final, overwrite=replace, user_path=user_path)
            except outputs.OutputExists:
                raise Exists(user_path) from None
        finally:
            # Published: the temp name is gone already. Anything else: nothing stays behind.
            try:
                temp.unlink()
            except FileNotFoundError:
                pass
        return Stored(path=user_path, size=size, sha256=digest.hexdigest())

    def file(self, user_path: str) -> Path:
        """The regular file ``user_path`` names (UnsafePath when there is none)."""
        return paths.input_path(self.root, user_path)

    def delete(self, user_path: str) -> None:
        self.file(user_path).unlink()

    def list(self, prefix: str = "", *, after: str | None = None, limit: int = 100) -> list[Entry]:
        """Regular files whose name starts with ``prefix``, in name order, after ``after``.

        In-flight names and symbolic links are never listed: neither is a file a job or
        a GET could use.
        """
        real_root = os.path.realpath(self.root)
        start = real_root
        directory = prefix.rpartition("/")[0]
        if directory:
            try:
                start = str(paths.confine(self.root, directory))
            except paths.UnsafePath:
                return []
        entries = []
        for current, dirnames, filenames in os.walk(start):
            dirnames[:] = [d for d in dirnames if paths.TEMP_MARKER not in d]
            for filename in filenames:
                if paths.TEMP_MARKER in filename:
                    continue
                full = os.path.join(current, filename)
                name = os.path.relpath(full, real_root).replace(os.sep, "/")
                if not name.startswith(prefix) or (after is not None and name <= after):
                    continue
                try:
                    info = os.lstat(full)
                except FileNotFoundError:
                    continue  # removed since the listing
                if stat.S_ISREG(info.st_mode):
                    entries.append(Entry(name=name, size=info.st_size, mtime=info.st_mtime))
        entries.sort(key=lambda e: e.name)
        return entries[:limit]
