"""Beat's maintenance tasks: reap, re-dispatch, prune, clean orphaned temp files.

Each task is small and takes its thresholds from the settings. They run on
their own queue (``<task_queue>.maintenance``) so they never wait behind the
job queue's backlog.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from celery import shared_task

from ffworker import paths, reaper
from ffworker.dispatch import dispatch
from ffworker.extensions import services

log = logging.getLogger("ffworker.maintenance")

ORPHAN_MIN_AGE_S = 300.0
PRUNE_MAX_BATCHES = 50


@shared_task(name="ffworker.maintenance.reap", ignore_result=True)
def reap() -> dict:
    current = services()
    report = reaper.reap(current.ledger, stale_after_s=current.settings.stale_after_s,
                         grace_s=current.settings.reaper_grace_s)
    for decision in report.requeued:
        dispatch(decision["id"], countdown=(decision["run_after"] - decision["updated_at"]).total_seconds())
    return {"status": report.status, "reaped": len(report.decisions)}


@shared_task(name="ffworker.maintenance.redispatch", ignore_result=True)
def redispatch() -> int:
    """Publish again the queued, due jobs whose message was lost."""
    current = services()
    job_ids = current.ledger.due_for_dispatch(current.settings.redispatch_after_s)
    published = sum(dispatch(job_id) for job_id in job_ids)
    if job_ids:
        log.info("event=redispatched count=%d of=%d", published, len(job_ids))
    return published


@shared_task(name="ffworker.maintenance.prune", ignore_result=True)
def prune() -> dict:
    current = services()
    pruned = 0
    for _ in range(PRUNE_MAX_BATCHES):
        deleted = current.ledger.prune(current.settings.retention_days)
        pruned += deleted
        if deleted == 0:
            break
    removed = remove_orphaned_temp_files(current.ledger, Path(current.settings.media_root))
    if pruned or removed:
        log.info("event=pruned jobs=%d temp_files=%d", pruned, len(removed))
    return {"jobs": pruned, "temp_files": len(removed)}


def remove_orphaned_temp_files(ledger, media_root: Path, min_age_s: float = ORPHAN_MIN_AGE_S) -> list[Path]:
    """Delete temp outputs (files or HLS directories) that no running attempt owns.

    A killed worker cannot clean up after itself; its temp file names carry the
    job id and attempt, so the ledger says whether anyone still writes them.
    """
    candidates: dict[Path, tuple[str, int]] = {}
    now = time.time()
    for directory, dirnames, filenames in os.walk(media_root):
        for name in [*filenames, *dirnames]:
            parsed = paths.parse_temp_name(name)
            path = Path(directory) / name
            if parsed is not None and now - path.lstat().st_mtime >= min_age_s:
                candidates[path] = parsed
        dirnames[:] = [d for d in dirnames if paths.parse_temp_name(d) is None]
    owned = ledger.running_attempts(sorted({job_id for job_id, _ in candidates.values()}))
    removed = []
    for path, owner in candidates.items():
        if owner in owned:
            continue
        _remove(path)
        removed.append(path)
    return removed


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
