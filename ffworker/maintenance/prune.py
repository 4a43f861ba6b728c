"""Retention: delete old terminal jobs, and temp outputs and uploads that killed processes left.

Thresholds: terminal jobs finished more than ``FFWORKER_RETENTION_DAYS`` ago go, with
their events, ``BATCH`` rows per statement and at most ``MAX_BATCHES`` per round, and so
do probe cache entries stored more than that long ago; a
temp output is an orphan once no running attempt owns it and it is older than
``ORPHAN_MIN_AGE_S``. With object storage, an incomplete multipart upload under the
bucket's prefix is an orphan once it has been idle (initiated, and sent its last part)
for ``ORPHAN_MIN_AGE_S``. Runs every ``EVERY_S``.
"""
from __future__ import annotations

import logging
import os
import time
from email.utils import parsedate_to_datetime
from pathlib import Path

from celery import shared_task

from ffworker import outputs, paths, s3
from ffworker.extensions import services
from ffworker.ledger import Ledger

log = logging.getLogger("ffworker.maintenance")

TASK = "ffworker.maintenance.prune"
SCHEDULE_ENTRY = "prune-old-jobs"
EVERY_S = 3600.0
BATCH = 1000
MAX_BATCHES = 50
ORPHAN_MIN_AGE_S = 300.0


def interval_s(settings) -> float:
    return EVERY_S


@shared_task(name=TASK, ignore_result=True)
def task() -> dict:
    current = services()
    pruned = prune_jobs(current.ledger, current.settings.retention_days)
    removed = remove_orphaned_temp_files(current.ledger, Path(current.settings.media_root), ORPHAN_MIN_AGE_S)
    bucket = s3.bucket(current.settings)
    aborted = abort_orphaned_uploads(bucket, ORPHAN_MIN_AGE_S) if bucket is not None else []
    if pruned or removed or aborted:
        log.info("event=pruned jobs=%d temp_files=%d uploads=%d", pruned, len(removed), len(aborted))
    return {"jobs": pruned, "temp_files": len(removed), "uploads": len(aborted)}


def prune_jobs(ledger: Ledger, retention_days: int) -> int:
    """Delete terminal jobs past the retention, then probe cache entries as old, batch by
    batch (short transactions)."""
    return _in_batches(ledger.prune, retention_days) + _in_batches(ledger.prune_probes, retention_days)


def _in_batches(delete_batch, retention_days: int) -> int:
    pruned = 0
    for _ in range(MAX_BATCHES):
        deleted = delete_batch(retention_days, batch=BATCH)
        pruned += deleted
        if deleted == 0:
            break
    return pruned


def remove_orphaned_temp_files(ledger: Ledger, media_root: Path, min_age_s: float = ORPHAN_MIN_AGE_S) -> list[Path]:
    """Delete temp outputs (files or HLS directories) that no running attempt owns.

    A killed worker cannot clean up after itself; its temp file names carry the
    job id and attempt, so the ledger says whether anyone still writes them.
    """
    candidates: dict[Path, tuple[str, int]] = {}
    now = time.time()
    for directory, dirnames, filenames in os.walk(media_root):
        for name in [*filenames, *dirnames]:
            parsed = paths.parse_temp_name(name)
            if parsed is None:
                continue
            path = Path(directory) / name
            try:
                modified = path.lstat().st_mtime
            except FileNotFoundError:
                continue  # published or removed since the listing: not an orphan
            if now - modified >= min_age_s:
                candidates[path] = parsed
        dirnames[:] = [d for d in dirnames if paths.parse_temp_name(d) is None]
    owned = ledger.running_attempts(sorted({job_id for job_id, _ in candidates.values()}))
    removed = []
    for path, owner in candidates.items():
        if owner in owned:
            continue
        outputs.remove(path)
        removed.append(path)
    return removed


def abort_orphaned_uploads(bucket: s3.Bucket, min_age_s: float = ORPHAN_MIN_AGE_S, client=None) -> list[str]:
    """Abort the incomplete multipart uploads under the bucket's prefix idle for ``min_age_s``;
    their keys.

    A web or worker process killed mid-upload leaves one behind: no object, but its parts
    are stored (and paid for) until someone aborts it. Idle, not old: an upload is judged by
    its last part, so a long upload still sending parts is never cut; and by the server's
    clock (its ``Date``), which also stamped the upload, so clock skew plays no part.
    """
    client = client if client is not None else s3.client()
    params = {"Bucket": bucket.name, "Prefix": f"{bucket.prefix}/" if bucket.prefix else ""}
    aborted = []
    while True:
        page = client.list_multipart_uploads(**params)
        now = _server_time(page)
        for upload in page.get("Uploads", []):
            if now - _last_activity(client, bucket.name, upload) < min_age_s:
                continue
            try:
                client.abort_multipart_upload(Bucket=bucket.name, Key=upload["Key"], UploadId=upload["UploadId"])
            except client.exceptions.NoSuchUpload:
                continue  # completed or aborted since the listing
            aborted.append(upload["Key"])
        if not page.get("IsTruncated"):
            return aborted
        params.update(KeyMarker=page["NextKeyMarker"], UploadIdMarker=page["NextUploadIdMarker"])


def _last_activity(client, bucket_name: str, upload: dict) -> float:
    """When the upload last moved: its newest part, or its start (epoch seconds)."""
    latest = upload["Initiated"].timestamp()
    params = {"Bucket": bucket_name, "Key": upload["Key"], "UploadId": upload["UploadId"]}
    while True:
        page = client.list_parts(**params)
        for part in page.get("Parts", []):
            latest = max(latest, part["LastModified"].timestamp())
        if not page.get("IsTruncated"):
            return latest
        params["PartNumberMarker"] = page["NextPartNumberMarker"]


def _server_time(response: dict) -> float:
    """The server's now, rounded up: ``Date`` counts whole seconds while parts are stamped
    finer, so the true time lies within the second after it."""
    date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    return parsedate_to_datetime(date).timestamp() + 1.0 if date else time.time()
