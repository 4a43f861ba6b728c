"""Jobs on object storage through real worker processes: a worker killed while it uploads an
output leaves no object behind and the retry completes; a web process and a worker that
share nothing but the bucket (two hosts, each with its own local media root)."""
from __future__ import annotations

import socket
import subprocess
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from ffworker import process, worker
from ffworker.dispatch import dispatch
from tests.conftest import WorkerProcess
from tests.helpers import gunicorn, wait_until
from tests.integration.test_jobs_on_s3 import TenantObjects, scratch_left
from tests.integration.test_maintenance import reaper_running, requeue_dead_run  # noqa: F401 (fixture)

pytestmark = pytest.mark.e2e


class PartGate:
    """A TCP proxy in front of the S3 server that holds back every part upload (a request
    whose line carries ``partNumber=``) until ``close``: while it holds one, a multipart
    upload is certainly open and certainly not completed."""

    MARK = b"partNumber="

    def __init__(self, endpoint: str) -> None:
        target = urlsplit(endpoint)
        self.target = (target.hostname, target.port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.held = threading.Event()
        self.released = threading.Event()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.released.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, outbound: bool) -> None:
        tail = b""
        try:
            while data := source.recv(1 << 16):
                if outbound and self.MARK in tail + data:
                    self.held.set()
                    self.released.wait()
                    return
                tail = data[-len(self.MARK):]
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.released.set()
        self.listener.close()
        for sock in self.sockets:
            sock.close()


def raw_clip(path: Path, seconds: int = 8) -> Path:
    """Uncompressed video (≈ 2.9 MB/s): a stream copy of it makes an output of several parts."""
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi",
                    "-i", f"testsrc2=size=320x240:rate=25:duration={seconds}",
                    "-c:v", "rawvideo", "-pix_fmt", "yuv420p", str(path)], check=True)
    return path


def test_a_worker_killed_during_the_output_upload_leaves_no_object_and_the_retry_completes(
        app, settings, ledger, engine, tenant, s3_server, s3_settings, tmp_path, reaper_running):  # noqa: F811
    objects = TenantObjects(s3_server, s3_settings, tenant)
    objects.put("raw.mkv", raw_clip(tmp_path / "raw.mkv").read_bytes())
    gate = PartGate(s3_server.endpoint)
    killed = WorkerProcess(settings, tmp_path / "worker.log",
                           env={"FFWORKER_STORAGE_URL": s3_settings.storage_url, "AWS_ENDPOINT_URL": gate.url})
    try:
        job, _ = ledger.create(tenant_id=tenant.id, kind="transcode", workspace="default", priority=0, metadata={},
                               max_attempts=3, timeout_s=120,
                               spec={"input": "raw.mkv", "output": "out/copy.mkv", "video": {"codec": "copy"},
                                     "audio": {"codec": "none"}})
        with app.app_context():
            dispatch(job["id"])
        assert gate.held.wait(60), killed.log_path.read_text()[-3000:]
        # Held in its first part: the multipart upload is open, the output is not an object.
        uploads = objects.s3.list_multipart_uploads(Bucket=objects.bucket.name).get("Uploads", [])
        assert [upload["Key"] for upload in uploads] == [objects.key("out/copy.mkv")]
        killed.kill()
    finally:
        killed.stop()
        gate.close()

    assert objects.paths() == {"raw.mkv"}
    row = ledger.get(job["id"])
    assert (row["status"], row["outputs_placed_attempt"]) == ("running", 1)
    requeue_dead_run(engine, ledger, settings, job["id"])

    report = worker.run(job["id"], ledger, s3_settings)

    assert report.outcome == "completed", report.row and report.row["error_message"]
    assert objects.paths() == {"raw.mkv", "out/copy.mkv"}
    (output,) = report.row["result"]["outputs"]
    assert objects.head("out/copy.mkv")["ContentLength"] == output["size_bytes"] > 16 << 20
    probe = process.ffprobe(str(objects.download("out/copy.mkv", tmp_path / "got")), timeout_s=10)
    assert float(probe["format"]["duration"]) == pytest.approx(8.0, abs=0.1)
    assert scratch_left(job["id"]) == []


# -- two hosts -----------------------------------------------------------------------------
# The files API steps are small functions of their own: the rest of the test is about the worker.


def upload(base: str, tenant, path: str, data: bytes) -> None:
    response = requests.put(f"{base}/v1/files/{path}", data=data, headers=tenant.headers, timeout=30)
    assert response.status_code in (200, 201), response.text


def download(base: str, tenant, path: str) -> bytes:
    response = requests.get(f"{base}/v1/files/{path}", headers=tenant.headers, timeout=30)
    assert response.status_code == 200, response.text
    return response.content


def run_job(base: str, tenant, body: dict) -> dict:
    response = requests.post(f"{base}/v1/jobs", json=body, headers=tenant.headers, timeout=30)
    assert response.status_code == 202, response.text

    def finished():
        job = requests.get(f"{base}/v1/jobs/{response.json()['id']}", params={"wait": 5}, headers=tenant.headers,
                           timeout=30).json()
        return job if job["status"] in ("completed", "failed", "cancelled") else None

    job = wait_until(finished, 90, interval_s=0.1)
    assert job["status"] == "completed", job["error"]
    return job


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_web_and_worker_on_two_hosts_share_nothing_but_the_bucket(
        settings, tenant, s3_server, s3_settings, make_clip, tmp_path, purge_queue):
    clip = make_clip(tmp_path / "clip.mp4", seconds=2).read_bytes()
    web_root, worker_root = tmp_path / "web-media", tmp_path / "worker-media"
    web_root.mkdir()
    storage = {"FFWORKER_STORAGE_URL": s3_settings.storage_url}
    with gunicorn(tmp_path / "web.log", {**storage, "FFWORKER_MEDIA_ROOT": str(web_root)}) as (base, _):
        host_b = WorkerProcess(settings, tmp_path / "worker.log",
                               env={**storage, "FFWORKER_MEDIA_ROOT": str(worker_root)})
        try:
            upload(base, tenant, "in/clip.mp4", clip)
            transcoded = run_job(base, tenant, {"kind": "transcode", "input": "in/clip.mp4", "output": "out/small.mp4",
                                                "video": {"codec": "h264", "height": 144}})
            ladder = run_job(base, tenant, {"kind": "hls", "input": "out/small.mp4", "output_dir": "ladder",
                                            "renditions": [144], "segment_s": 1})
            small = download(base, tenant, "out/small.mp4")
            master = download(base, tenant, "ladder/master.m3u8")
        finally:
            host_b.stop()

    (output,) = transcoded["result"]["outputs"]
    assert requests.get(output["url"], timeout=10).content == small
    assert small == TenantObjects(s3_server, s3_settings, tenant).get("out/small.mp4")
    (playlist,) = ladder["result"]["outputs"]
    assert requests.get(playlist["url"], timeout=10).content == master
    assert b"144p.m3u8" in master
    got = tmp_path / "got"
    got.mkdir()
    (got / "small.mp4").write_bytes(small)
    assert process.ffprobe(str(got / "small.mp4"), timeout_s=10)["streams"][0]["height"] == 144
    # Nothing of the jobs on the web host's disk, nothing at all on the worker host's media root.
    assert not [p for p in files_under(web_root) if "out" in p.parts or "ladder" in p.parts]
    assert files_under(worker_root) == []
