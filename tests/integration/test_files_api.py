"""The ``/v1/files`` API on the local media store: streaming uploads, downloads, listing."""
from __future__ import annotations

import hashlib
import io
import os
import tracemalloc

import pytest

from ffworker import paths

pytestmark = pytest.mark.integration


def temp_files(root) -> list[str]:
    return [name for _, dirs, files in os.walk(root) for name in dirs + files if paths.TEMP_MARKER in name]


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


@pytest.fixture
def small_limit_app(settings):
    from ffworker.app import create_app

    app = create_app({"TESTING": True, "FFWORKER_SETTINGS": settings.with_overrides(max_upload_bytes=1000)})
    yield app
    app.extensions["ffworker_events"].hub.close()


def test_an_upload_is_a_file_jobs_can_name_and_comes_back_byte_for_byte(client, tenant):
    body = os.urandom(5000)
    put = client.put("/v1/files/in/clip.mp4", data=body, headers=tenant.headers)
    assert put.status_code == 201, put.get_data(as_text=True)
    assert put.get_json() == {"path": "in/clip.mp4", "size": 5000, "sha256": hashlib.sha256(body).hexdigest()}
    # The same rules and the same place as a job's input.
    assert paths.input_path(tenant.media, "in/clip.mp4").read_bytes() == body
    get = client.get("/v1/files/in/clip.mp4", headers=tenant.headers)
    assert get.status_code == 200 and get.data == body
    head = client.head("/v1/files/in/clip.mp4", headers=tenant.headers)
    assert head.status_code == 200 and head.content_length == 5000 and head.data == b""
    assert head.headers["ETag"] == get.headers["ETag"]


def test_range_and_etag_requests(client, tenant):
    body = bytes(range(256)) * 40
    client.put("/v1/files/a.bin", data=body, headers=tenant.headers)
    part = client.get("/v1/files/a.bin", headers={**tenant.headers, "Range": "bytes=1000-1099"})
    assert part.status_code == 206 and part.data == body[1000:1100]
    assert part.headers["Content-Range"] == f"bytes 1000-1099/{len(body)}"
    tail = client.get("/v1/files/a.bin", headers={**tenant.headers, "Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.data == body[-10:]
    etag = client.get("/v1/files/a.bin", headers=tenant.headers).headers["ETag"]
    cached = client.get("/v1/files/a.bin", headers={**tenant.headers, "If-None-Match": etag})
    assert cached.status_code == 304 and cached.data == b""
    client.put("/v1/files/a.bin", data=body + b"more", headers=tenant.headers)
    changed = client.get("/v1/files/a.bin", headers={**tenant.headers, "If-None-Match": etag})
    assert changed.status_code == 200 and changed.data == body + b"more"


def test_if_none_match_star_refuses_to_replace(client, tenant, settings):
    client.put("/v1/files/keep.txt", data=b"first", headers=tenant.headers)
    refused = client.put("/v1/files/keep.txt", data=b"second", headers={**tenant.headers, "If-None-Match": "*"})
    assert refused.status_code == 412
    assert (tenant.media / "keep.txt").read_bytes() == b"first"
    assert temp_files(tenant.media) == []
    created = client.put("/v1/files/new.txt", data=b"fresh", headers={**tenant.headers, "If-None-Match": "*"})
    assert created.status_code == 201
    replaced = client.put("/v1/files/keep.txt", data=b"second", headers=tenant.headers)
    assert replaced.status_code == 201 and (tenant.media / "keep.txt").read_bytes() == b"second"


def test_a_broken_upload_leaves_nothing(client, tenant):
    response = client.put("/v1/files/broken.bin", headers=tenant.headers, environ_overrides={
        "wsgi.input": Truncated(b"x" * 3000), "CONTENT_LENGTH": "10000"})
    assert response.status_code == 400
    assert not (tenant.media / "broken.bin").exists()
    assert temp_files(tenant.media) == []


def test_the_upload_limit_answers_413_and_leaves_nothing(small_limit_app, make_tenant):
    tenant = make_tenant("acme")
    client = small_limit_app.test_client()
    declared = client.put("/v1/files/big.bin", data=b"x" * 1001, headers=tenant.headers)
    assert declared.status_code == 413
    # No Content-Length (chunked): the limit is counted while streaming.
    streamed = client.put("/v1/files/big.bin", headers=tenant.headers, environ_overrides={
        "wsgi.input": Chunks(5, 300), "HTTP_TRANSFER_ENCODING": "chunked", "wsgi.input_terminated": True})
    assert streamed.status_code == 413
    assert not (tenant.media / "big.bin").exists() and temp_files(tenant.media) == []
    exact = client.put("/v1/files/ok.bin", data=b"x" * 1000, headers=tenant.headers)
    assert exact.status_code == 201
    # Chunked, through a server that cannot hand the body on: refused rather than stored empty.
    unknown_length = client.put("/v1/files/ok.bin", headers=tenant.headers, environ_overrides={
        "wsgi.input": Chunks(1, 10), "HTTP_TRANSFER_ENCODING": "chunked", "wsgi.input_terminated": False})
    assert unknown_length.status_code == 411


@pytest.mark.parametrize("name", ["../escape.txt", ".ffwtmp.x.1.a.mp4", "a/-option.mp4", "concat:a|b", "dir/"])
def test_names_follow_the_job_path_rules(client, tenant, name):
    response = client.put(f"/v1/files/{name}", data=b"x", headers=tenant.headers)
    assert response.status_code == 422, response.get_data(as_text=True)
    assert response.get_json()["errors"]["path"]
    assert temp_files(tenant.media) == [] and not (tenant.media.parent / "escape.txt").exists()


def test_files_are_the_tenants_own(client, tenant, other_tenant, tmp_path):
    client.put("/v1/files/secret.txt", data=b"acme only", headers=tenant.headers)
    assert client.get("/v1/files/secret.txt", headers=other_tenant.headers).status_code == 404
    assert client.get("/v1/files", headers=other_tenant.headers).get_json()["files"] == []
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"not media")
    (tenant.media / "link.txt").symlink_to(outside)
    assert client.get("/v1/files/link.txt", headers=tenant.headers).status_code == 404
    assert client.get("/v1/files/secret.txt").status_code == 401


def test_delete(client, tenant):
    client.put("/v1/files/gone.txt", data=b"x", headers=tenant.headers)
    assert client.delete("/v1/files/gone.txt", headers=tenant.headers).status_code == 204
    assert not (tenant.media / "gone.txt").exists()
    assert client.delete("/v1/files/gone.txt", headers=tenant.headers).status_code == 404
    assert client.get("/v1/files/gone.txt", headers=tenant.headers).status_code == 404


def test_listing_pages_in_name_order_and_hides_in_flight_names(client, tenant):
    for name in ["b/2.txt", "a.txt", "b/1.txt", "c.txt", "b/sub/3.txt"]:
        client.put(f"/v1/files/{name}", data=name.encode(), headers=tenant.headers)
    (tenant.media / "b" / ".ffwtmp.0f0e0d0c-0000-4000-8000-000000000000.1.x.mp4").write_bytes(b"partial")
    seen, cursor = [], None
    while True:
        query = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/files", query_string=query, headers=tenant.headers).get_json()
        assert len(page["files"]) <= 2
        seen += page["files"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [f["name"] for f in seen] == ["a.txt", "b/1.txt", "b/2.txt", "b/sub/3.txt", "c.txt"]
    assert seen[0]["size"] == len("a.txt") and isinstance(seen[0]["mtime"], float)
    under_b = client.get("/v1/files", query_string={"prefix": "b/"}, headers=tenant.headers).get_json()
    assert [f["name"] for f in under_b["files"]] == ["b/1.txt", "b/2.txt", "b/sub/3.txt"]
    assert under_b["next_cursor"] is None
    bad = client.get("/v1/files", query_string={"cursor": "!!!"}, headers=tenant.headers)
    assert bad.status_code == 422


def test_200_mb_streams_through_the_api_both_ways(client, tenant, tmp_path):
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
            put = client.put("/v1/files/big.bin", input_stream=body, content_length=size, headers=tenant.headers)
        _, upload_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        get = client.get("/v1/files/big.bin", headers=tenant.headers, buffered=False)
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
    # Streamed, not buffered: a few chunks in memory at most, never the body.
    assert upload_peak < 16 << 20 and download_peak < 16 << 20, (upload_peak, download_peak)
    with open(source, "rb") as original:
        for start in (0, size // 2 + 12345, size - 4096):
            part = client.get("/v1/files/big.bin", headers={**tenant.headers, "Range": f"bytes={start}-{start + 4095}"})
            original.seek(start)
            assert part.status_code == 206 and part.data == original.read(4096)
