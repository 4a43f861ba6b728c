"""A run's media in object-storage mode: a scratch directory standing in for the tenant's.

With ``FFWORKER_STORAGE_URL=s3://bucket/prefix`` a worker shares nothing with the web
processes but the bucket. Each run works in a directory of its own (``fetch.scratch_dir``:
one per job and attempt, what a killed earlier attempt left removed first) whose ``media/``
plays the tenant's media directory, so planners name and confine paths exactly as in local
mode:

- an input is downloaded when the planner names it, to the same relative path, after a HEAD
  that gives its size (capped per file and per run) and its identity (size, ETag,
  Last-Modified: what the probe cache keys it by); the GETs are conditional on that ETag, so
  the bytes on disk are those of the object the HEAD described;
- outputs, once placed in the scratch root (``outputs.publish``), are uploaded by boto3's
  transfer manager: a file above ``s3.PART_BYTES`` as a multipart upload, which the bucket
  shows only once it is completed (a smaller file in one PUT, equally whole or absent); a
  directory (an HLS ladder) file by file with its entry (the master playlist) last, then,
  when it replaced an earlier one, without the earlier files the new one lacks. Without
  overwrite every write is conditional (``If-None-Match: *``): an object that appeared
  meanwhile is not replaced, and what the upload wrote is deleted again;
- ``remove`` deletes the directory: the worker calls it on every way out of a run.

A transfer watches a stop event and the job's deadline (a cancel, a lost fence, the
timeout): it is cancelled, which aborts a multipart upload once the requests in flight
(one part each at most) have ended.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError
from s3transfer.exceptions import RetriesExceededError, S3DownloadFailedError
from s3transfer.manager import TransferConfig, TransferManager
from s3transfer.subscribers import BaseSubscriber

from ffworker import fetch, outputs, paths, s3
from ffworker.kinds.base import Output, PlanError

log = logging.getLogger("ffworker.staging")

# How soon a transfer notices a stop or the job's deadline.
WATCH_INTERVAL_S = 0.05
_TRANSFER_CONFIG = TransferConfig(multipart_threshold=s3.PART_BYTES, multipart_chunksize=s3.PART_BYTES)
# Answers no retry changes: the credentials, the permissions or the bucket are wrong, and an
# operator must act. Any other failure (throttling, 5xx, a broken connection, an unknown
# code) counts as transient: a wrong guess costs at most max_attempts runs.
PERMANENT_CODES = s3.REFUSED_CODES | {"AllAccessDisabled", "NoSuchBucket", "InvalidBucketName", "AccountProblem"}
# What a browser or a player fetching a presigned URL is told it gets.
CONTENT_TYPES = {
    ".m3u8": "application/vnd.apple.mpegurl", ".ts": "video/mp2t", ".mp4": "video/mp4",
    ".m4a": "audio/mp4", ".mov": "video/quicktime", ".mkv": "video/x-matroska", ".webm": "video/webm",
    ".mp3": "audio/mpeg", ".ogg": "audio/ogg", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
    ".png": "image/png", ".webp": "image/webp",
}
_DELETE_BATCH = 1000  # DeleteObjects takes at most this many keys
RUN_METADATA = "ffworker-run"  # x-amz-meta-ffworker-run: the job and attempt that wrote an object


class StorageFailed(Exception):
    """The bucket failed or refused a request of the run: ``code`` is the job's error code,
    ``retryable`` whether another attempt may succeed."""

    def __init__(self, code: str, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable


class TransferStopped(Exception):
    """A transfer was stopped from outside (cancel, lost fence) or ran out of the job's time."""


@dataclass(frozen=True)
class ObjectIdentity:
    """An object as a HEAD saw it: a rewritten object has another ETag or Last-Modified."""

    size: int
    etag: str
    last_modified: datetime

    @classmethod
    def of(cls, head: dict) -> "ObjectIdentity":
        return cls(head["ContentLength"], head["ETag"], head["LastModified"])

    @property
    def mtime_ns(self) -> int:
        return int(self.last_modified.timestamp()) * 1_000_000_000 + self.last_modified.microsecond * 1000

    @property
    def etag_digest(self) -> int:
        """The ETag as a 63-bit number (what the probe cache's integer column can hold)."""
        return int.from_bytes(hashlib.sha256(self.etag.encode()).digest()[:8], "big") >> 1


class Stage:
    """One run's scratch directory and its transfers from and to the tenant's objects."""

    def __init__(self, settings, tenant: str, job_id: str, attempt: int) -> None:
        self.bucket = s3.bucket(settings)
        self.tenant = tenant
        # Marks the objects this run writes (``RUN_METADATA``), so that it can tell them apart.
        self.run = f"{job_id}.{attempt}"
        self.max_file_bytes = settings.max_upload_bytes
        self.max_run_bytes = settings.scratch_max_bytes
        self.dir = fetch.scratch_dir(job_id, attempt)
        # Resolved: paths.confine compares resolved paths, and TMPDIR may lead through a symlink.
        self.root = Path(os.path.realpath(self.dir)) / "media"
        self.root.mkdir()
        self.objects: dict[str, ObjectIdentity] = {}  # relative path → the object downloaded there
        self.downloaded_bytes = 0
        self._bucket_seen = False

    def key(self, relative: str) -> str:
        return self.bucket.key(self.tenant, relative)

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def downloads_dir(self) -> Path:
        """Where URL inputs go (``fetch.download``), beside the media, never among it."""
        directory = self.dir / "urls"
        directory.mkdir(exist_ok=True)
        return directory

    def remove(self) -> None:
        outputs.remove(self.dir)

    # -- inputs ---------------------------------------------------------------

    def fetch(self, user_path: str, *, stop: threading.Event, deadline: float) -> Path:
        """The tenant's file ``user_path``, downloaded once into the scratch root; refused as a
        missing local file is (``paths.UnsafePath``) when there is no such object."""
        target = paths.confine(self.root, user_path)
        relative = self.relative(target)
        if relative not in self.objects:
            what = f"input {user_path!r}"
            identity = self.stat(relative, what, code="input_unavailable")
            if identity is not None:
                self._make_room(what, identity.size)
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with TransferManager(s3.client(), _TRANSFER_CONFIG) as manager:
                        settled = _Settled()
                        future = manager.download(self.bucket.name, self.key(relative), str(target),
                                                  subscribers=[_Known(identity), settled])
                        failed = settled.wait([future], stop, deadline)
                except TransferStopped:
                    target.unlink(missing_ok=True)
                    raise
                if failed is not None:
                    raise as_failure(failed[1], f"{what} could not be downloaded from the bucket", "input_unavailable")
                self.objects[relative] = identity
                self.downloaded_bytes += identity.size
        return paths.input_path(self.root, user_path)

    def stat(self, relative: str, what: str, *, code: str) -> ObjectIdentity | None:
        """The object's identity (HEAD), or None when there is none."""
        try:
            return ObjectIdentity.of(s3.client().head_object(Bucket=self.bucket.name, Key=self.key(relative)))
        except ClientError as exc:
            if s3.error_code(exc) not in s3.NOT_FOUND_CODES:
                raise as_failure(exc, f"{what} could not be looked up in the bucket", code) from None
        except BotoCoreError as exc:
            raise as_failure(exc, f"{what} could not be looked up in the bucket", code) from None
        self._require_bucket(what, code)
        return None

    def _require_bucket(self, what: str, code: str) -> None:
        """A HEAD's 404 has no body to tell a missing object from a missing bucket: a wrong
        FFWORKER_STORAGE_URL must not pass for a tenant's missing file."""
        if self._bucket_seen:
            return
        try:
            s3.client().head_bucket(Bucket=self.bucket.name)
        except ClientError as exc:
            if s3.error_code(exc) in s3.NOT_FOUND_CODES | {"NoSuchBucket"}:
                raise StorageFailed(code, f"{what}: the media bucket does not exist", retryable=False) from None
            raise as_failure(exc, f"{what} could not be looked up in the bucket", code) from None
        except BotoCoreError as exc:
            raise as_failure(exc, f"{what} could not be looked up in the bucket", code) from None
        self._bucket_seen = True

    def _make_room(self, what: str, size: int) -> None:
        if size > self.max_file_bytes:
            raise StorageFailed("input_unavailable", f"{what} is too large: {size} bytes, more than the "
                                                     f"{self.max_file_bytes} an input may have", retryable=False)
        if self.downloaded_bytes + size > self.max_run_bytes:
            raise StorageFailed("input_unavailable", f"{what} is too large: with it the job's inputs would take "
                                                     f"more than the {self.max_run_bytes} bytes a run may download",
                                retryable=False)

    # -- outputs ----------------------------------------------------------------

    def check_output(self, output: Output, *, overwrite: bool, own: bool) -> None:
        """At planning, what ``paths.output_path`` checks of a local target, asked of the bucket:
        without overwrite an existing object (or, for a directory, any object under it) is
        refused; with it, a directory is replaced only where its entry shows an earlier output
        of the same kind. A target holding this job's own earlier objects (``own``) is replaced."""
        if own:
            return
        relative = self.relative(output.final)
        what = f"output {output.user_path!r}"
        if not output.is_dir:
            if not overwrite and self.stat(relative, what, code="storage_unavailable") is not None:
                raise paths.UnsafePath(f"{what} already exists; set overwrite to replace it")
            return
        if not self._has_objects(relative + "/", what):
            return
        if not overwrite:
            raise paths.UnsafePath(f"{what} already exists; set overwrite to replace it")
        if output.entry and self.stat(f"{relative}/{output.entry}", what, code="storage_unavailable") is None:
            raise PlanError("output_exists", f"{what} exists and holds no {output.entry}; overwrite replaces only "
                                             "a previous output of this kind, never other files")

    def upload(self, placed: list[Output], *, overwrite: bool, stop: threading.Event, deadline: float) -> None:
        """Upload the placed outputs: files, then the directories' entries, then (with overwrite)
        remove what the directories held before and no longer do. Without overwrite nothing is
        replaced, and a failure or a stop deletes what this upload wrote."""
        written: list[str] = []
        attempted: list[str] = []
        try:
            if not overwrite:
                for output in placed:
                    if output.is_dir and self._has_objects(self.relative(output.final) + "/",
                                                           f"output {output.user_path!r}"):
                        raise outputs.OutputExists(f"output {output.user_path!r} appeared while the job ran; "
                                                   "set overwrite to replace it")
            files = [(output, path) for output in placed for path in _files_of(output)]
            entries = [(output, path) for output, path in files if _is_entry(output, path)]
            others = [item for item in files if item not in entries]
            client = s3.client() if overwrite else s3.no_replace_client()
            with TransferManager(client, _TRANSFER_CONFIG) as manager:
                for batch in (others, entries):
                    self._upload_batch(manager, batch, written, attempted, stop, deadline)
            if overwrite:
                for output in placed:
                    if output.is_dir:
                        self._remove_stale(output, {self.key(self.relative(path)) for path in _files_of(output)})
        except BaseException:
            if not overwrite:
                self._take_back(written, attempted)
            raise

    def _upload_batch(self, manager, batch, written: list[str], attempted: list[str], stop, deadline) -> None:
        if not batch:
            return
        keys = [self.key(self.relative(path)) for _, path in batch]
        attempted.extend(keys)
        settled = _Settled()
        futures = [manager.upload(str(path), self.bucket.name, key, subscribers=[settled],
                                  extra_args={"ContentType": CONTENT_TYPES.get(path.suffix.lower(),
                                                                               "application/octet-stream"),
                                              "Metadata": {RUN_METADATA: self.run}})
                   for (_, path), key in zip(batch, keys)]
        try:
            failed = settled.wait(futures, stop, deadline)
        finally:
            written.extend(key for key, future in zip(keys, futures) if _succeeded(future))
        if failed is None:
            return
        index, exc = failed
        output = batch[index][0]
        if isinstance(exc, ClientError) and s3.error_code(exc) == "PreconditionFailed":
            raise outputs.OutputExists(f"output {output.user_path!r} appeared while the job ran; "
                                       "set overwrite to replace it")
        raise as_failure(exc, f"output {output.user_path!r} could not be uploaded", "storage_unavailable")

    def _has_objects(self, prefix: str, what: str) -> bool:
        try:
            listed = s3.client().list_objects_v2(Bucket=self.bucket.name, Prefix=self.key(prefix), MaxKeys=1)
        except (BotoCoreError, ClientError) as exc:
            raise as_failure(exc, f"{what} could not be looked up in the bucket", "storage_unavailable") from None
        return listed.get("KeyCount", 0) > 0

    def _remove_stale(self, output: Output, keep: set[str]) -> None:
        """Delete what a replaced directory held that the new one does not (its entry is up)."""
        prefix = self.key(self.relative(output.final) + "/")
        try:
            pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket.name, Prefix=prefix)
            stale = [item["Key"] for page in pages for item in page.get("Contents", []) if item["Key"] not in keep]
            self._delete(stale)
        except (BotoCoreError, ClientError) as exc:
            raise as_failure(exc, f"output {output.user_path!r}: the files of the directory it replaced could "
                                  "not be removed", "storage_unavailable") from None

    def _take_back(self, written: list[str], attempted: list[str]) -> None:
        """Delete what this upload created; a failure to is logged (the run's own error stands).

        A transfer cancelled while its request was in flight reports itself cancelled, yet the
        bucket may have taken the object: each such key is deleted when the object there
        carries this run's mark (the write was conditional, so a marked object is this run's,
        and an unmarked one, such as the object that made the upload fail, is someone else's).
        """
        try:
            unsure = [key for key in attempted if key not in written]
            self._delete(written + [key for key in unsure if self._written_by_this_run(key)])
        except (BotoCoreError, ClientError) as exc:
            log.warning("event=take_back_failed keys=%d error=%s", len(attempted), type(exc).__name__)

    def _written_by_this_run(self, key: str) -> bool:
        try:
            head = s3.client().head_object(Bucket=self.bucket.name, Key=key)
        except ClientError as exc:
            if s3.error_code(exc) in s3.NOT_FOUND_CODES:
                return False
            raise
        return head.get("Metadata", {}).get(RUN_METADATA) == self.run

    def _delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = keys[start:start + _DELETE_BATCH]
            answer = s3.client().delete_objects(Bucket=self.bucket.name, Delete={
                "Objects": [{"Key": key} for key in batch], "Quiet": True})
            if answer.get("Errors"):
                first = answer["Errors"][0]
                raise ClientError({"Error": {"Code": first.get("Code"), "Message": first.get("Message")}},
                                  "DeleteObjects")


class _Known(BaseSubscriber):
    """Gives the transfer manager the size and ETag the HEAD saw: it then sends no HEAD of its
    own, and every GET is conditional on that ETag (a changed object fails the download)."""

    def __init__(self, identity: ObjectIdentity) -> None:
        self.identity = identity

    def on_queued(self, future, **kwargs) -> None:
        future.meta.provide_transfer_size(self.identity.size)
        future.meta.provide_object_etag(self.identity.etag)


class _Settled(BaseSubscriber):
    """Wakes the waiting run as each of its transfers ends (a transfer of a few kilobytes takes
    milliseconds: polling alone would add up to WATCH_INTERVAL_S to each)."""

    def __init__(self) -> None:
        self.ended = threading.Event()

    def on_done(self, future, **kwargs) -> None:
        self.ended.set()

    def wait(self, futures: list, stop: threading.Event, deadline: float) -> tuple[int, Exception] | None:
        """Wait for every transfer: None when all succeeded, else the first failure (its index
        and error), the others cancelled. A stop or the deadline cancels them all (TransferStopped)."""
        while True:
            if stop.is_set() or time.monotonic() >= deadline:
                _cancel(futures)
                raise TransferStopped()
            self.ended.clear()  # before looking: an end from now on wakes the next wait
            finished = 0
            for index, future in enumerate(futures):
                if future.done():
                    finished += 1
                    try:
                        future.result()
                    except Exception as exc:
                        _cancel(futures)
                        return index, exc
            if finished == len(futures):
                return None
            self.ended.wait(WATCH_INTERVAL_S)


def _cancel(futures: list) -> None:
    """Cancel the transfers and wait until each has ended (a cancelled multipart upload is
    aborted as its requests in flight end)."""
    for future in futures:
        future.cancel()
    for future in futures:
        _succeeded(future)


def _succeeded(future) -> bool:
    try:
        future.result()
    except Exception:
        return False
    return True


def _files_of(output: Output) -> list[Path]:
    if not output.is_dir:
        return [output.final]
    return sorted(p for p in output.final.rglob("*") if p.is_file() and not p.is_symlink())


def _is_entry(output: Output, path: Path) -> bool:
    return output.is_dir and output.entry is not None and path == output.final / output.entry


def as_failure(exc: Exception, what: str, code: str) -> Exception:
    """A failed request as the run's failure, retryable unless retrying cannot change it;
    an error that is not the bucket's (an OSError of the scratch disk) as it is."""
    if isinstance(exc, ClientError):
        name = s3.error_code(exc)
        return StorageFailed(code, f"{what} ({name})", retryable=name not in PERMANENT_CODES)
    if isinstance(exc, S3DownloadFailedError):
        return StorageFailed(code, f"{what} (it changed while being downloaded)", retryable=True)
    if isinstance(exc, (BotoCoreError, RetriesExceededError)):
        return StorageFailed(code, f"{what} ({type(exc).__name__})", retryable=True)
    return exc
