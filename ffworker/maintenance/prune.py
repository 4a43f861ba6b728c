"""Retention: delete old terminal jobs, and temp outputs that killed workers left.

Thresholds: terminal jobs finished more than ``FFWORKER_RETENTION_DAYS`` ago go, with
their events, ``BATCH`` rows per statement and at most ``MAX_BATCHES`` per round; a
temp output is an orphan once no running attempt owns it and it is older than
``ORPHAN_MIN_AGE_S``. Runs every ``EVERY_S``.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from celery import shared_task

from ffworker import outputs, paths
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
    removed = remove_orphaned_temp_files(current.ledger, Path(current.settings.media_root))
    if pruned or removed:
        log.info("event=pruned jobs=%d temp_files=%d", pruned, len(removed))
    return {"jobs": pruned, "temp_files": len(removed)}


def prune_jobs(ledger: Ledger, retention_days: int) -> int:
    """Delete terminal jobs past the retention, batch by batch (short transactions)."""
    pruned = 0
    for _ in range(MAX_BATCHES):
        deleted = ledger.prune(retention_days, batch=BATCH)
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
