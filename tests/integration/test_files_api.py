"""The ``/v1/files`` API on both media stores (the local directory and a real S3 bucket):
streaming uploads, downloads, listing; and what only the bucket has (conditional writes that
race, keys that are no job path, the bucket failing)."""
from __future__ import annotations

import errno
import hashlib
import io
import os
import resource
import signal
import threading
import tracemalloc
from contextlib import contextmanager
from dataclasses import dataclass
import pytest

from ffworker import paths, s3, storage
from tests.helpers import make_celery_current, wait_until
from tests.pgserver import free_port

pytestmark = pytest.mark.integration


def temp_files(root) -> list[str]:
    return [name for _, dirs, files in os.walk(root) for name in dirs + files if paths.TEMP_MARKER in name]


@dataclass
class Files:
    """The files API of one store as a test sees it: a client of an app on that store, and
    the store's contents read (and planted) beside the API."""

    kind: str
    app: object
    client: object
    settings: object
    tenant: object

    @property
    def headers(self) -> dict:
        return self.tenant.headers

    @property
    def store(self):
        return storage.for_tenant(self.settings, self.tenant.name)

    def stored(self, name: str) -> bytes | None:
        """The bytes stored under ``name``, or None."""
        if self.kind == "local":
            path = self.tenant.media / name
            return path.read_bytes() if path.is_file() else None
        try:
            return self._s3().get_object(Bucket=self._bucket.name, Key=self._key(name))["Body"].read()
        except self._s3().exceptions.NoSuchKey:
            return None

    def plant(self, name: str, data: bytes) -> None:
        """A file put there by something other than the API (a job, an operator)."""
        if self.kind == "local":
            (self.tenant.media / name).parent.mkdir(parents=True, exist_ok=True)
            (self.tenant.media / name).write_bytes(data)
        else:
            self._s3().put_object(Bucket=self._bucket.name, Key=self._key(name), Body=data)

    def leftovers(self) -> list[str]:
        """What a broken upload could leave: in-flight files, or incomplete multipart uploads."""
        if self.kind == "local":
            return temp_files(self.tenant.media)
        return [u["Key"] for u in self._s3().list_multipart_uploads(Bucket=self._bucket.name).get("Uploads", [])]

    @property
    def _bucket(self) -> s3.Bucket:
        return s3.bucket(self.settings)

    def _key(self, name: str) -> str:
        return self._bucket.key(self.tenant.name, name)

    def _s3(self):
        return s3.client()


@contextmanager
def files_factory(kind: str, request, settings, tenant):
    """make(**setting overrides) → Files on the local store, or on a new bucket ("s3")."""
    from ffworker.app import create_app

    apps = []

    def make(**overrides) -> Files:
        if kind == "local" and not overrides:
            app = request.getfixturevalue("app")
            return Files("local", app, app.test_client(), settings, tenant)
        base = settings if kind == "local" else request.getfixturevalue("s3_settings")
        values = base.with_overrides(**overrides)
        app = create_app({"TESTING": True, "FFWORKER_SETTINGS": values})
        apps.append(app)
        return Files(kind, app, app.test_client(), values, tenant)

    try:
        yield make
    finally:
        for app in apps:
            app.extensions["ffworker_events"].hub.close()
        if apps:  # a new app makes its Celery the current one: the session's again
            make_celery_current(request.getfixturevalue("app"))


@pytest.fixture(params=["local", "s3"])
def make_files(request, settings, tenant):
    with files_factory(request.param, request, settings, tenant) as make:
        yield make


@pytest.fixture
def files(make_files) -> Files:
    return make_files()


@pytest.fixture
def make_bucket_files(request, settings, tenant):
    """make_files on the bucket only, for what only the bucket has."""
    with files_factory("s3", request, settings, tenant) as make:
        yield make


@pytest.fixture
def bucket_files(make_bucket_files) -> Files:
    return make_bucket_files()


class Truncated(io.RawIOBase):
    """A body that ends before its Content-Length: what a client killed mid-upload sends."""

    def __init__(self, data: bytes) -> None:
        self.data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        chunk = self.data.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)


class Chunks(io.RawIOBase):
    """``count`` chunks of ``size`` bytes, generated as they are read (a body of unknown length)."""

    def __init__(self, count: int, size: int) -> None:
        self.left, self.size = count, size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.left == 0:
            return 0
        self.left -= 1
        n = min(self.size, len(buffer))
        buffer[:n] = b"x" * n
        return n



# On the bucket an upload holds one part (s3.PART_BYTES) while it is sent.
UPLOAD_BOUND = 2 * s3.PART_BYTES

DOWNLOAD_HEADERS = {"Content-Type", "Content-Length", "Content-Disposition", "ETag", "Last-Modified", "Date",
                    "Accept-Ranges", "Cache-Control", "Expires"}


def test_an_upload_is_a_file_jobs_can_name_and_comes_back_byte_for_byte(files):
    body = os.urandom(5000)
    put = files.client.put("/v1/files/in/clip.mp4", data=body, headers=files.headers)
    assert put.status_code == 201, put.get_data(as_text=True)
    assert put.get_json() == {"path": "in/clip.mp4", "size": 5000, "sha256": hashlib.sha256(body).hexdigest()}
    # The same rules and the same place as a job's input.
    files.store.input_file("in/clip.mp4")
    assert files.stored("in/clip.mp4") == body
    get = files.client.get("/v1/files/in/clip.mp4", headers=files.headers)
    assert get.status_code == 200 and get.data == body
    assert set(get.headers.keys()) == DOWNLOAD_HEADERS, get.headers
    head = files.client.head("/v1/files/in/clip.mp4", headers=files.headers)
    assert head.status_code == 200 and head.content_length == 5000 and head.data == b""
    assert head.headers["ETag"] == get.headers["ETag"]


def test_range_and_etag_requests(files):
    client, headers = files.client, files.headers
    body = bytes(range(256)) * 40
    client.put("/v1/files/a.bin", data=body, headers=headers)
    part = client.get("/v1/files/a.bin", headers={**headers, "Range": "bytes=1000-1099"})
    assert part.status_code == 206 and part.data == body[1000:1100]
    assert part.headers["Content-Range"] == f"bytes 1000-1099/{len(body)}"
    tail = client.get("/v1/files/a.bin", headers={**headers, "Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.data == body[-10:]
    outside = client.get("/v1/files/a.bin", headers={**headers, "Range": f"bytes={len(body)}-"})
    assert outside.status_code == 416 and outside.headers["Content-Range"] == f"bytes */{len(body)}"
    etag = client.get("/v1/files/a.bin", headers=headers).headers["ETag"]
    cached = client.get("/v1/files/a.bin", headers={**headers, "If-None-Match": etag})
    assert cached.status_code == 304 and cached.data == b""
    client.put("/v1/files/a.bin", data=body + b"more", headers=headers)
    changed = client.get("/v1/files/a.bin", headers={**headers, "If-None-Match": etag})
    assert changed.status_code == 200 and changed.data == body + b"more"


def test_if_none_match_star_refuses_to_replace(files):
    client, headers = files.client, files.headers
    client.put("/v1/files/keep.txt", data=b"first", headers=headers)
    refused = client.put("/v1/files/keep.txt", data=b"second", headers={**headers, "If-None-Match": "*"})
    assert refused.status_code == 412
    assert files.stored("keep.txt") == b"first"
    assert files.leftovers() == []
    created = client.put("/v1/files/new.txt", data=b"fresh", headers={**headers, "If-None-Match": "*"})
    assert created.status_code == 201
    replaced = client.put("/v1/files/keep.txt", data=b"second", headers=headers)
    assert replaced.status_code == 201 and files.stored("keep.txt") == b"second"


def test_a_broken_upload_leaves_nothing(files):
    # Past one part: on the bucket, a multipart upload is under way when the body breaks off.
    response = files.client.put("/v1/files/broken.bin", headers=files.headers, environ_overrides={
        "wsgi.input": Truncated(b"x" * (s3.PART_BYTES + 3000)), "CONTENT_LENGTH": str(2 * s3.PART_BYTES)})
    assert response.status_code == 400
    assert files.stored("broken.bin") is None
    assert files.leftovers() == []


@contextmanager
def file_size_limit(limit_bytes: int):
    """Writes past ``limit_bytes`` fail with EFBIG in this process (as a full disk fails them)."""
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error, not a killed process
    previous = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, previous[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, previous)
        signal.signal(signal.SIGXFSZ, previous_handler)


def test_a_write_that_fails_mid_upload_fails_the_upload_and_leaves_nothing(tenant, tmp_path):
    # The file is written on a thread of its own while the next chunks are read: its error
    # must still reach the upload, which leaves neither the file nor its in-flight name.
    store = storage.LocalStore(tmp_path / "media")
    body = io.BytesIO(os.urandom(12 * storage.CHUNK_BYTES))
    with file_size_limit(3 * storage.CHUNK_BYTES + 100), pytest.raises(OSError) as failed:
        store.put("big.bin", body, max_bytes=1 << 30)
    assert failed.value.errno == errno.EFBIG
    assert list((tmp_path / "media").iterdir()) == []
    assert "upload-writer" not in {thread.name for thread in threading.enumerate()}


def test_the_upload_limit_answers_413_and_leaves_nothing(make_files):
    files = make_files(max_upload_bytes=1000)
    client, headers = files.client, files.headers
    declared = client.put("/v1/files/big.bin", data=b"x" * 1001, headers=headers)
    assert declared.status_code == 413
    # No Content-Length (chunked): the limit is counted while streaming.
    streamed = client.put("/v1/files/big.bin", headers=headers, environ_overrides={
        "wsgi.input": Chunks(5, 300), "HTTP_TRANSFER_ENCODING": "chunked", "wsgi.input_terminated": True})
    assert streamed.status_code == 413
    assert files.stored("big.bin") is None and files.leftovers() == []
    exact = client.put("/v1/files/ok.bin", data=b"x" * 1000, headers=headers)
    assert exact.status_code == 201
    # Chunked, through a server that cannot hand the body on: refused rather than stored empty.
    unknown_length = client.put("/v1/files/ok.bin", headers=headers, environ_overrides={
        "wsgi.input": Chunks(1, 10), "HTTP_TRANSFER_ENCODING": "chunked", "wsgi.input_terminated": False})
    assert unknown_length.status_code == 411


def test_going_over_the_limit_after_the_first_part_leaves_nothing(make_files):
    files = make_files(max_upload_bytes=s3.PART_BYTES + 100)
    streamed = files.client.put("/v1/files/big.bin", headers=files.headers, environ_overrides={
        "wsgi.input": Chunks(17, 1 << 20), "HTTP_TRANSFER_ENCODING": "chunked", "wsgi.input_terminated": True})
    assert streamed.status_code == 413
    assert files.stored("big.bin") is None and files.leftovers() == []


@pytest.mark.parametrize("name", ["../escape.txt", ".ffwtmp.x.1.a.mp4", "a/-option.mp4", "concat:a|b", "dir/"])
def test_names_follow_the_job_path_rules(files, tenant, name):
    response = files.client.put(f"/v1/files/{name}", data=b"x", headers=files.headers)
    assert response.status_code == 422, response.get_data(as_text=True)
    assert response.get_json()["errors"]["path"]
    assert files.leftovers() == [] and not (tenant.media.parent / "escape.txt").exists()


def test_the_namespace_stays_a_tree(files):
    """No file below a file, no file where a directory is: the bucket refuses what a directory would."""
    files.plant("a.mp4", b"file")
    files.plant("d/x.mp4", b"below d")
    below = files.client.put("/v1/files/a.mp4/b.mp4", data=b"x", headers=files.headers)
    assert below.status_code == 422
    assert below.get_json()["errors"]["path"] == ["output 'a.mp4/b.mp4': 'a.mp4' is a file, not a directory"]
    over = files.client.put("/v1/files/d", data=b"x", headers=files.headers)
    assert over.status_code == 422 and over.get_json()["errors"]["path"] == ["output 'd' is an existing directory"]
    assert files.client.get("/v1/files/d", headers=files.headers).status_code == 404
    assert files.stored("a.mp4") == b"file" and files.stored("d") is None


def test_files_are_the_tenants_own(files, other_tenant):
    client = files.client
    client.put("/v1/files/secret.txt", data=b"acme only", headers=files.headers)
    assert client.get("/v1/files/secret.txt", headers=other_tenant.headers).status_code == 404
    assert client.get("/v1/files", headers=other_tenant.headers).get_json()["files"] == []
    assert client.get("/v1/files/secret.txt").status_code == 401


def test_a_symbolic_link_leading_outside_is_not_served(client, tenant, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"not media")
    (tenant.media / "link.txt").symlink_to(outside)
    assert client.get("/v1/files/link.txt", headers=tenant.headers).status_code == 404


def test_delete(files):
    client, headers = files.client, files.headers
    client.put("/v1/files/gone.txt", data=b"x", headers=headers)
    assert client.delete("/v1/files/gone.txt", headers=headers).status_code == 204
    assert files.stored("gone.txt") is None
    assert client.delete("/v1/files/gone.txt", headers=headers).status_code == 404
    assert client.get("/v1/files/gone.txt", headers=headers).status_code == 404


def test_listing_pages_in_name_order_and_hides_in_flight_names(files):
    client, headers = files.client, files.headers
    for name in ["b/2.txt", "a.txt", "b/1.txt", "c.txt", "b/sub/3.txt"]:
        client.put(f"/v1/files/{name}", data=name.encode(), headers=headers)
    files.plant("b/.ffwtmp.0f0e0d0c-0000-4000-8000-000000000000.1.x.mp4", b"partial")
    seen, cursor = [], None
    while True:
        query = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/files", query_string=query, headers=headers).get_json()
        assert len(page["files"]) <= 2
        seen += page["files"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [f["name"] for f in seen] == ["a.txt", "b/1.txt", "b/2.txt", "b/sub/3.txt", "c.txt"]
    assert seen[0]["size"] == len("a.txt") and isinstance(seen[0]["mtime"], float)
    under_b = client.get("/v1/files", query_string={"prefix": "b/"}, headers=headers).get_json()
    assert [f["name"] for f in under_b["files"]] == ["b/1.txt", "b/2.txt", "b/sub/3.txt"]
    assert under_b["next_cursor"] is None
    bad = client.get("/v1/files", query_string={"cursor": "!!!"}, headers=headers)
    assert bad.status_code == 422


def test_200_mb_streams_through_the_api_both_ways(files, tmp_path):
    client, headers = files.client, files.headers
    size = 200 * 1024 * 1024
    source = tmp_path / "big.bin"
    digest = hashlib.sha256()
    with open(source, "wb") as out:
        for _ in range(size // (4 << 20)):
            chunk = os.urandom(4 << 20)
            digest.update(chunk)
            out.write(chunk)
    tracemalloc.start()
    try:
        with open(source, "rb") as body:
            put = client.put("/v1/files/big.bin", input_stream=body, content_length=size, headers=headers)
        _, upload_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        get = client.get("/v1/files/big.bin", headers=headers, buffered=False)
        download = hashlib.sha256()
        received = 0
        for chunk in get.response:
            download.update(chunk)
            received += len(chunk)
        get.close()
        _, download_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert put.status_code == 201 and put.get_json()["sha256"] == digest.hexdigest()
    assert received == size and download.hexdigest() == digest.hexdigest()
    # Streamed, not buffered: a few chunks in memory at most (on the bucket, one part of an
    # upload), never the body.
    upload_bound = 16 << 20 if files.kind == "local" else UPLOAD_BOUND
    assert upload_peak < upload_bound and download_peak < 16 << 20, (upload_peak, download_peak)
    with open(source, "rb") as original:
        for start in (0, size // 2 + 12345, size - 4096):
            part = client.get("/v1/files/big.bin", headers={**headers, "Range": f"bytes={start}-{start + 4095}"})
            original.seek(start)
            assert part.status_code == 206 and part.data == original.read(4096)



# -- what only the bucket has -------------------------------------------------------------


class Paused(io.RawIOBase):
    """``data`` as a body that stops after ``pause_at`` bytes until ``go`` is set; ``started``
    is set at the first read (the store has checked the name by then)."""

    def __init__(self, data: bytes, pause_at: int) -> None:
        self.data, self.pause_at = io.BytesIO(data), pause_at
        self.started, self.go = threading.Event(), threading.Event()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        self.started.set()
        position = self.data.tell()
        if position == self.pause_at:
            assert self.go.wait(30)
        chunk = self.data.read(min(len(buffer), self.pause_at - position if position < self.pause_at else len(buffer)))
        buffer[:len(chunk)] = chunk
        return len(chunk)


@pytest.mark.parametrize("size", [1000, s3.PART_BYTES + 1000], ids=["one-put", "multipart"])
def test_if_none_match_star_is_decided_by_the_conditional_write(bucket_files, size):
    """Two uploads of one new name with If-None-Match: *: both pass the existence check, the
    later completion loses (412) and leaves nothing of its own, whichever way it writes."""
    files = bucket_files
    slow = Paused(b"s" * size, pause_at=size - 100)
    answers = {}

    def upload_slowly():
        client = files.app.test_client()
        answers["slow"] = client.put("/v1/files/race.bin", headers={**files.headers, "If-None-Match": "*"},
                                     environ_overrides={"wsgi.input": slow, "CONTENT_LENGTH": str(size)})

    thread = threading.Thread(target=upload_slowly)
    thread.start()
    try:
        assert slow.started.wait(30)
        if size > s3.PART_BYTES:  # the first part is sent: the multipart upload exists
            wait_until(lambda: files.leftovers() == [files._key("race.bin")])
        fast = files.client.put("/v1/files/race.bin", data=b"fast", headers={**files.headers, "If-None-Match": "*"})
        assert fast.status_code == 201
    finally:
        slow.go.set()
        thread.join(60)
    assert answers["slow"].status_code == 412, answers["slow"].get_data(as_text=True)
    assert files.stored("race.bin") == b"fast"
    assert files.leftovers() == []


def test_keys_that_are_no_job_path_are_neither_listed_nor_served(bucket_files):
    files = bucket_files
    for name in ["ok.mp4", "dir/", "-option.mp4", "in/.ffwtmp.0f0e0d0c-0000-4000-8000-000000000000.1.x.mp4",
                 "concat:a", "x\x01.mp4"]:
        files.plant(name, b"x")
    listed = files.client.get("/v1/files", headers=files.headers).get_json()
    assert [f["name"] for f in listed["files"]] == ["ok.mp4"]
    assert files.client.get("/v1/files/in/.ffwtmp.0f0e0d0c-0000-4000-8000-000000000000.1.x.mp4",
                            headers=files.headers).status_code == 422
    # A name is the normalised job path: "./ok.mp4" and "ok.mp4" are one file, as on disk.
    assert files.client.get("/v1/files/./ok.mp4", headers=files.headers).data == b"x"


@pytest.fixture
def s3_environment(monkeypatch):
    """setenv(name, value): change one of boto3's variables for this test; the processes' clients
    are made anew after each change, and after the test."""

    def setenv(name: str, value: str) -> None:
        monkeypatch.setenv(name, value)
        s3.client.cache_clear()

    yield setenv
    monkeypatch.undo()
    s3.client.cache_clear()


def test_a_bucket_that_cannot_answer_is_503_with_a_clear_message(bucket_files, s3_environment, caplog):
    files = bucket_files
    files.plant("in.mp4", b"x")
    s3_environment("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    for response in (files.client.get("/v1/files/in.mp4", headers=files.headers),
                     files.client.put("/v1/files/new.mp4", data=b"x", headers=files.headers),
                     files.client.get("/v1/files", headers=files.headers),
                     files.client.post("/v1/jobs", json={"kind": "probe", "input": "in.mp4"}, headers=files.headers)):
        assert response.status_code == 503, response.get_data(as_text=True)
        assert "refused this server's credentials" in response.get_json()["message"]
    assert "event=object_storage_refused" in caplog.text
    s3_environment("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    down = files.client.get("/v1/files/in.mp4", headers=files.headers)
    assert down.status_code == 503 and "did not answer" in down.get_json()["message"]
    assert "Traceback" not in down.get_data(as_text=True)


def test_a_missing_bucket_is_503(make_bucket_files):
    files = make_bucket_files(storage_url="s3://ffw-no-such-bucket/media")
    response = files.client.get("/v1/files", headers=files.headers)
    assert response.status_code == 503, response.get_data(as_text=True)


def test_a_path_too_long_for_an_object_key_is_422(bucket_files):
    name = "d/" * 507 + "x.mp4"   # within the 1,024 characters of a job path; the key adds its prefix
    response = bucket_files.client.put(f"/v1/files/{name}", data=b"x", headers=bucket_files.headers)
    assert response.status_code == 422 and "object key" in response.get_json()["errors"]["path"][0]
