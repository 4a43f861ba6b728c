"""The files API through the real web server (gunicorn as the Procfile starts it): an upload
whose web process is killed outright leaves no file under its name, and what it left (an
in-flight file, or on object storage an incomplete multipart upload) is the prune duty's to
remove."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from ffworker import paths, s3
from ffworker.maintenance.prune import abort_orphaned_uploads, remove_orphaned_temp_files
from tests.helpers import environment_of, gunicorn, wait_until

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def in_flight(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if paths.TEMP_MARKER in p.name]


def test_a_web_process_killed_during_an_upload_leaves_no_file(settings, tenant, ledger, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with open(tmp_path / "gunicorn.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "ffworker/gunicorn_conf.py"),
             "--bind", f"127.0.0.1:{port}", "--workers", "1", "--threads", "8", "ffworker.app:create_app()"],
            cwd=ROOT, env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def healthy() -> bool:
            try:
                return requests.get(f"http://127.0.0.1:{port}/health", timeout=5).ok
            except requests.RequestException:
                return proc.poll() is not None  # exited: the assertion below says so
        wait_until(healthy, timeout_s=60)
        assert proc.poll() is None, (tmp_path / "gunicorn.log").read_text()[-2000:]

        upload = socket.create_connection(("127.0.0.1", port))
        upload.sendall(
            f"PUT /v1/files/big/clip.mp4 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tenant.key}\r\n"
            f"Content-Length: {64 << 20}\r\n\r\n".encode() + b"x" * (1 << 20))
        # The body so far is on disk under its in-flight name, and nowhere else.
        wait_until(lambda: any(p.stat().st_size > 0 for p in in_flight(tenant.media)))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        upload.close()

        assert not (tenant.media / "big" / "clip.mp4").exists()
        assert len(in_flight(tenant.media)) == 1
        # Uploads are no job's attempt: the cleanup finds no running owner for the leftover.
        removed = remove_orphaned_temp_files(ledger, Path(settings.media_root), min_age_s=0)
        assert in_flight(tenant.media) == [] and len(removed) == 1
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


def test_a_web_process_killed_during_an_upload_to_the_bucket_leaves_no_object(s3_settings, tenant, tmp_path):
    bucket = s3.bucket(s3_settings)
    client = s3.client()

    def uploads() -> list[dict]:
        return client.list_multipart_uploads(Bucket=bucket.name).get("Uploads", [])

    def parts_sent() -> bool:
        return any(client.list_parts(Bucket=bucket.name, Key=u["Key"], UploadId=u["UploadId"]).get("Parts")
                   for u in uploads())

    with gunicorn(tmp_path / "gunicorn.log", environment_of(s3_settings)) as (url, proc):
        port = int(url.rpartition(":")[2])
        upload = socket.create_connection(("127.0.0.1", port))
        upload.sendall(
            f"PUT /v1/files/big/clip.mp4 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tenant.key}\r\n"
            f"Content-Length: {64 << 20}\r\n\r\n".encode() + b"x" * (s3.PART_BYTES + (1 << 20)))
        # The first part is in the bucket, in a multipart upload: nothing anyone can read.
        wait_until(parts_sent)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        upload.close()

    assert client.list_objects_v2(Bucket=bucket.name).get("KeyCount", 0) == 0
    assert [u["Key"] for u in uploads()] == [bucket.key(tenant.name, "big/clip.mp4")]
    # Idle for as long as the threshold (0 here): the prune duty aborts it, and its parts go.
    assert abort_orphaned_uploads(bucket, min_age_s=0) == [bucket.key(tenant.name, "big/clip.mp4")]
    assert uploads() == []

