"""A tenant's media store as the files API and the submit-time checks see it.

Two stores, one interface, picked by ``for_tenant``:

- ``LocalStore``: the tenant's directory under ``FFWORKER_MEDIA_ROOT``, the same one jobs
  read and write. An upload is written to an in-flight name (``paths.temp_path_for``, so
  the orphan cleanup of ``maintenance/prune.py`` also removes what a killed web process
  left) and moved into place only once it is complete (``outputs.publish_file``).
- ``S3Store``: the tenant's objects ``<prefix>/<tenant>/<name>`` in the bucket of
  ``FFWORKER_STORAGE_URL`` (``s3.py``). An upload is a multipart upload completed only once
  the body is whole (aborted otherwise); an incomplete one is invisible, and the prune duty
  aborts what a killed process left.

Either way every name goes through the rules jobs use (``paths.py``): a file the API
accepts is a file a job may name, and the other way round, and a broken upload leaves
nothing under the final name. The submit-time checks of the kinds (``kinds/base.Media``)
ask a store whether an input exists and whether an output may be written, so they give
the same answers, with the same messages, on both stores.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import posixpath
import queue
import stat
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from botocore.exceptions import ClientError, HTTPClientError, NoCredentialsError
from botocore.exceptions import ConnectionError as S3ConnectionError
from werkzeug.exceptions import RequestedRangeNotSatisfiable
from werkzeug.utils import send_file
from werkzeug.wrappers import Response

from ffworker import outputs, paths, s3

log = logging.getLogger("ffworker.storage")

CHUNK_BYTES = 1024 * 1024
# Uploads are not jobs: attempt 0 never belongs to a claim (claims count from 1), so the
# orphan cleanup finds no running owner and removes an abandoned upload once it is idle.
UPLOAD_ATTEMPT = 0
MIMETYPE = "application/octet-stream"


class TooLarge(Exception):
    """The body exceeds the upload limit."""


class Exists(Exception):
    """The file exists and the request asked not to replace it."""


class Unavailable(Exception):
    """The media store cannot answer now (object storage unreachable, failing or refusing
    this server's credentials): a 503, never the client's fault. Details are logged."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


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


def for_tenant(settings, tenant_name: str) -> "LocalStore | S3Store":
    """The tenant's media store: its bucket prefix with ``FFWORKER_STORAGE_URL``, else its directory."""
    bucket = s3.bucket(settings)
    if bucket is None:
        return LocalStore(paths.tenant_root(settings, tenant_name))
    return S3Store(bucket, tenant_name)


class _Writer(threading.Thread):
    """Writes an upload's chunks to its file while the request's thread reads and hashes the
    next ones. One after the other, a GiB took 0.6 s to read, 0.6 s to hash and 2.2 s to
    write here; side by side the upload runs at the speed of the write. At most
    ``QUEUED_CHUNKS`` chunks wait, so memory stays bounded whatever the file's size."""

    QUEUED_CHUNKS = 4

    def __init__(self, out: BinaryIO) -> None:
        super().__init__(name="upload-writer", daemon=True)
        self.out = out
        self.chunks: queue.Queue = queue.Queue(maxsize=self.QUEUED_CHUNKS)
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        while (chunk := self.chunks.get()) is not None:
            if self.error is None:  # after a failed write, only drain: the reader must not block
                try:
                    self.out.write(chunk)
                except BaseException as exc:
                    self.error = exc

    def write(self, chunk: bytes) -> None:
        if self.error is not None:
            raise self.error
        self.chunks.put(chunk)

    def close(self, *, quietly: bool = False) -> None:
        """Wait for every queued chunk; raise the write's error unless ``quietly`` (the
        upload already failed for another reason)."""
        self.chunks.put(None)
        self.join()
        if self.error is not None and not quietly:
            raise self.error


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
                writer = _Writer(out)
                try:
                    while chunk := body.read(CHUNK_BYTES):
                        size += len(chunk)
                        if size > max_bytes:
                            raise TooLarge(user_path)
                        digest.update(chunk)
                        writer.write(chunk)
                except BaseException:
                    writer.close(quietly=True)
                    raise
                writer.close()
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

    def response(self, user_path: str, environ: dict) -> Response:
        """The GET/HEAD answer: Range, ETag, If-None-Match and Last-Modified (werkzeug's
        conditional ``send_file``, served from the open file). UnsafePath when no file."""
        return send_file(self.file(user_path), environ, mimetype=MIMETYPE, conditional=True, etag=True, max_age=0)

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

    # -- the submit-time checks (kinds/base.Media) --------------------------------------

    def input_file(self, user_path: str) -> Path:
        return paths.input_path(self.root, user_path)

    def output_file(self, user_path: str, *, overwrite: bool, suffixes: frozenset[str] | None = None) -> Path:
        target = paths.output_path(self.root, user_path, overwrite=overwrite, suffixes=suffixes)
        paths.check_output_name(target, user_path)
        return target

    def output_dir(self, user_path: str, *, overwrite: bool) -> Path:
        target = paths.output_dir_path(self.root, user_path, overwrite=overwrite)
        paths.check_output_name(target, user_path)
        return target

    def holds_file(self, directory: Path, name: str) -> bool | None:
        return (directory / name).is_file() if directory.is_dir() else None


# -- object storage ---------------------------------------------------------------------

# What the client is told; the log line has the details (an endpoint or an error code
# is the operator's business, not the tenant's).
_DOWN = "the media store is unavailable (object storage did not answer); try again later"
_REFUSED = "the media store is unavailable (object storage refused this server's credentials)"
MAX_KEY_BYTES = 1024   # S3's limit on a key, the bucket's prefix and the tenant's included


@dataclass
class _Upload:
    """What has been read of an upload's body: its size against the limit, and its sha256."""

    user_path: str
    max_bytes: int
    size: int = 0
    digest: "hashlib._Hash" = field(default_factory=hashlib.sha256)

    def read_part(self, body: BinaryIO, buffer: bytearray) -> int:
        """Fill ``buffer`` from ``body`` (fewer bytes only at its end); TooLarge past the limit."""
        view = memoryview(buffer)
        filled = 0
        while filled < len(buffer):
            chunk = body.read(min(CHUNK_BYTES, len(buffer) - filled))
            if not chunk:
                break
            self.size += len(chunk)
            if self.size > self.max_bytes:
                raise TooLarge(self.user_path)
            self.digest.update(chunk)
            view[filled:filled + len(chunk)] = chunk
            filled += len(chunk)
        return filled


class S3Store:
    """One tenant's objects, keys ``<prefix>/<tenant>/<name>``, ``name`` a job path as
    ``paths.object_name`` normalises it. Raises ``paths.UnsafePath`` for any name jobs could
    not use, and ``Unavailable`` when the bucket cannot answer.

    A bucket has no directories: a name is a directory when keys lie below it. The store
    keeps the namespace a tree as the local one is (no file below a file, no file where a
    directory is), so that any set of a tenant's objects could be a directory's contents.
    """

    def __init__(self, bucket: s3.Bucket, tenant: str, client=None) -> None:
        self.bucket = bucket
        self.base = bucket.tenant_prefix(tenant)
        self.client = client if client is not None else s3.client()

    # -- the files API ------------------------------------------------------------------

    def put(self, user_path: str, body: BinaryIO, *, max_bytes: int, replace: bool = True) -> Stored:
        """Stream ``body`` to the object ``user_path`` names in ``s3.PART_BYTES`` parts, hashing as it goes.

        A body shorter than one part is one PutObject; a longer one a multipart upload,
        completed once the body has ended and aborted on any failure, so the object is
        the previous one or the whole new one. Memory: one part. Raises TooLarge past
        ``max_bytes`` and Exists when ``replace`` is false and the object is there (already,
        or by the time the upload completes: the write itself is conditional, If-None-Match).
        """
        name, kind = self._output(user_path, overwrite=True)
        if not replace and kind == "file":
            raise Exists(user_path)
        upload = _Upload(user_path, max_bytes)
        try:
            self._write(self.base + name, body, upload, condition={} if replace else {"IfNoneMatch": "*"})
        except ClientError as exc:
            if s3.error_code(exc) == "PreconditionFailed":
                raise Exists(user_path) from None
            raise
        return Stored(path=user_path, size=upload.size, sha256=upload.digest.hexdigest())

    def _write(self, key: str, body: BinaryIO, upload: _Upload, *, condition: dict) -> None:
        """One PutObject for a body shorter than a part, else a multipart upload, aborted
        unless it completes. Parts are read and sent in turn, one buffer for all of them."""
        buffer = bytearray(s3.PART_BYTES)
        filled = upload.read_part(body, buffer)
        if filled < len(buffer):
            self._call("put_object", Key=key, Body=bytes(memoryview(buffer)[:filled]), ContentType=MIMETYPE,
                       **condition)
            return
        upload_id = self._call("create_multipart_upload", Key=key, ContentType=MIMETYPE)["UploadId"]
        try:
            parts = []
            while filled:
                data = buffer if filled == len(buffer) else bytes(memoryview(buffer)[:filled])
                number = len(parts) + 1
                sent = self._call("upload_part", Key=key, UploadId=upload_id, PartNumber=number, Body=data)
                parts.append({"PartNumber": number, "ETag": sent["ETag"]})
                filled = upload.read_part(body, buffer) if filled == len(buffer) else 0
            self._call("complete_multipart_upload", Key=key, UploadId=upload_id,
                       MultipartUpload={"Parts": parts}, **condition)
        except BaseException:
            self._abort(key, upload_id)
            raise

    def response(self, user_path: str, environ: dict) -> Response:
        """The GET/HEAD answer, with the headers the local store gives (werkzeug's
        ``send_file`` and ``make_conditional``) from the object's HEAD. The body is streamed
        from one ranged GET of that very version (If-Match), made only when the body is
        read: a HEAD, a 304 or a 416 fetches nothing. FileNotFoundError when no object."""
        name = self._name(user_path)
        head = self._head(name)
        if head is None:
            raise FileNotFoundError(user_path)
        size = head["ContentLength"]
        reader = _ObjectReader(self, self.base + name, etag=head["ETag"], size=size)
        # Without the server's file wrapper: werkzeug's own keeps the reader seekable, so a
        # Range starts the GET at its first byte instead of reading up to it.
        plain = {key: value for key, value in environ.items() if key != "wsgi.file_wrapper"}
        rv = send_file(reader, plain, mimetype=MIMETYPE, download_name=posixpath.basename(name),
                       etag=head["ETag"].strip('"'), last_modified=head["LastModified"], max_age=0,
                       conditional=False)
        rv.content_length = size
        try:
            rv = rv.make_conditional(environ, accept_ranges=True, complete_length=size)
        except RequestedRangeNotSatisfiable:
            reader.close()
            raise
        if rv.status_code == 206:
            reader.stop = rv.content_range.stop
        return rv

    def delete(self, user_path: str) -> None:
        name = self._name(user_path)
        if self._head(name) is None:
            raise FileNotFoundError(user_path)
        self._call("delete_object", Key=self.base + name)

    def list(self, prefix: str = "", *, after: str | None = None, limit: int = 100) -> list[Entry]:
        """Objects whose name starts with ``prefix``, in name order (the bucket's: UTF-8 bytes,
        the same order as the local store's), after ``after``. Keys that are no job path
        (in-flight names, ``a//b``, directory markers ``a/``, ...) are never listed."""
        params = {"Prefix": self.base + prefix, "MaxKeys": min(limit, 1000)}
        if after is not None:
            params["StartAfter"] = self.base + after
        entries: list[Entry] = []
        while len(entries) < limit:
            page = self._call("list_objects_v2", **params)
            for item in page.get("Contents", []):
                name = item["Key"][len(self.base):]
                if _is_object_name(name):
                    entries.append(Entry(name=name, size=item["Size"], mtime=item["LastModified"].timestamp()))
            if not page.get("IsTruncated"):
                break
            params["ContinuationToken"] = page["NextContinuationToken"]
        return entries[:limit]

    # -- the submit-time checks (kinds/base.Media) --------------------------------------

    def input_file(self, user_path: str) -> PurePosixPath:
        name = self._name(user_path)
        paths.check_input_kind(self._kind(name, parents=False), user_path)
        return PurePosixPath(name)

    def output_file(self, user_path: str, *, overwrite: bool,
                    suffixes: frozenset[str] | None = None) -> PurePosixPath:
        return PurePosixPath(self._output(user_path, overwrite=overwrite, suffixes=suffixes)[0])

    def output_dir(self, user_path: str, *, overwrite: bool) -> PurePosixPath:
        name = self._name(user_path)
        paths.check_output_dir_kind(self._kind(name), user_path, overwrite=overwrite, parent_is_file=self._exists)
        target = PurePosixPath(name)
        paths.check_output_name(target, user_path)
        return target

    def holds_file(self, directory: PurePosixPath, name: str) -> bool | None:
        if not self._has_children(str(directory)):
            return None
        return self._exists(f"{directory}/{name}")

    # -- what exists --------------------------------------------------------------------

    def _name(self, user_path: str) -> str:
        """The object name of ``user_path`` (``paths.object_name``), if its key fits S3's limit."""
        name = paths.object_name(user_path)
        room = MAX_KEY_BYTES - len(self.base.encode())
        if len(name.encode()) > room:
            raise paths.UnsafePath(f"the path is longer than the {room} bytes an object key leaves it")
        return name

    def _output(self, user_path: str, *, overwrite: bool,
                suffixes: frozenset[str] | None = None) -> tuple[str, str | None]:
        """The object name of an output (the rules and messages of ``paths.output_path``) and what is there now."""
        name = self._name(user_path)
        if suffixes is not None:
            paths.check_suffix(PurePosixPath(name), user_path, suffixes)
        kind = self._kind(name)
        paths.check_output_kind(kind, user_path, overwrite=overwrite, parent_is_file=self._exists)
        paths.check_output_name(PurePosixPath(name), user_path)
        return name, kind

    def _kind(self, name: str, *, parents: bool = True) -> str | None:
        """'file', 'dir' (keys below it), 'not_a_dir' (a name on its way is a file) or None.
        ``parents=False`` skips the last test (one request per level) when it cannot matter."""
        if self._exists(name):
            return "file"
        if self._has_children(name):
            return "dir"
        if parents:
            parts = name.split("/")
            if any(self._exists("/".join(parts[:depth])) for depth in range(1, len(parts))):
                return "not_a_dir"
        return None

    def _head(self, name: str) -> dict | None:
        try:
            return self._call("head_object", Key=self.base + name)
        except ClientError as exc:
            if s3.error_code(exc) in s3.NOT_FOUND_CODES:
                return None
            raise

    def _exists(self, name: str) -> bool:
        return self._head(name) is not None

    def _has_children(self, name: str) -> bool:
        page = self._call("list_objects_v2", Prefix=f"{self.base}{name}/", MaxKeys=1)
        return bool(page.get("Contents"))

    def _abort(self, key: str, upload_id: str) -> None:
        """Abort a multipart upload, leaving it to the prune duty when the bucket cannot be reached."""
        try:
            self._call("abort_multipart_upload", Key=key, UploadId=upload_id)
        except (Unavailable, ClientError) as exc:
            log.warning("event=upload_abort_failed key=%s error=%s", key, exc)

    def _call(self, operation: str, **params):
        """One request to the bucket (boto3 retries transient failures itself). An outage,
        a 5xx, a missing bucket or refused credentials become Unavailable (logged); other
        client errors (404, 412) are the caller's."""
        try:
            return getattr(self.client, operation)(Bucket=self.bucket.name, **params)
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            if status == 403 or s3.error_code(exc) in s3.REFUSED_CODES:
                log.error("event=object_storage_refused operation=%s bucket=%s error=%s",
                          operation, self.bucket.name, exc)
                raise Unavailable(_REFUSED) from None
            if status >= 500 or s3.error_code(exc) == "NoSuchBucket":
                log.error("event=object_storage_unavailable operation=%s bucket=%s error=%s",
                          operation, self.bucket.name, exc)
                raise Unavailable(_DOWN) from None
            raise
        except NoCredentialsError as exc:
            log.error("event=object_storage_refused operation=%s error=%s", operation, exc)
            raise Unavailable(_REFUSED) from None
        except (S3ConnectionError, HTTPClientError) as exc:
            log.error("event=object_storage_unavailable operation=%s bucket=%s error=%s",
                      operation, self.bucket.name, exc)
            raise Unavailable(_DOWN) from None


class _ObjectReader(io.RawIOBase):
    """An object's bytes as the seekable file ``send_file`` serves. Nothing is fetched until
    the first read, which GETs from the position to ``stop`` (the end of the requested
    Range) the version the HEAD described (If-Match: a replaced object fails the response
    rather than splicing two versions)."""

    def __init__(self, store: S3Store, key: str, *, etag: str, size: int) -> None:
        super().__init__()
        self.store, self.key, self.etag = store, key, etag
        self.size = size
        self.position, self.stop = 0, size   # stop: the end of the bytes to serve
        self._body = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self._close_body()
        self.position = base + offset
        return self.position

    def readinto(self, buffer) -> int:
        if self.position >= self.stop:
            return 0
        if self._body is None:
            self._body = self.store._call("get_object", Key=self.key, IfMatch=self.etag,
                                          Range=f"bytes={self.position}-{self.stop - 1}")["Body"]
        data = self._body.read(min(len(buffer), self.stop - self.position))
        if not data:
            raise OSError(f"object {self.key} ended at byte {self.position} of {self.stop}")
        buffer[:len(data)] = data
        self.position += len(data)
        return len(data)

    def _close_body(self) -> None:
        if self._body is not None:
            self._body.close()
            self._body = None

    def close(self) -> None:
        self._close_body()
        super().close()


def _is_object_name(name: str) -> bool:
    """Whether ``name`` is a job path exactly as the store writes it (normalised)."""
    try:
        return paths.object_name(name) == name
    except paths.UnsafePath:
        return False
