"""The hourly orphan cleanup against a media tree that changes while it runs."""
from __future__ import annotations

import os
import time

import pytest

from ffworker import paths
from ffworker.maintenance import prune
from tests.integration.test_maintenance import running_job

pytestmark = pytest.mark.integration


def test_a_temp_file_gone_between_listing_and_stat_does_not_stop_the_cleanup(ledger, tenant, settings, monkeypatch):
    dead = running_job(ledger, tenant)
    ledger.fail(dead.job["id"], dead.token, code="x", message="x")
    tenant.media.mkdir(parents=True, exist_ok=True)
    published = paths.temp_path_for(tenant.media / "a.mp4", str(dead.job["id"]), dead.token)
    orphan = paths.temp_path_for(tenant.media / "b.mp4", str(dead.job["id"]), dead.token)
    for path in (published, orphan):
        path.write_bytes(b"partial")
        old = time.time() - 3600
        os.utime(path, (old, old))
    real_walk = os.walk

    def walk_then_publish(top, *args, **kwargs):
        # The listing names the file; it is renamed away (published) before the cleanup stats it.
        for directory, dirnames, filenames in real_walk(top, *args, **kwargs):
            if published.name in filenames:
                published.rename(tenant.media / "a.mp4")
            yield directory, dirnames, filenames

    monkeypatch.setattr(prune.os, "walk", walk_then_publish)
    removed = prune.remove_orphaned_temp_files(ledger, settings.media_root, min_age_s=600)

    assert removed == [orphan] and not orphan.exists()
    assert (tenant.media / "a.mp4").read_bytes() == b"partial"
