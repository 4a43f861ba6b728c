"""URL inputs: refused at submit unless enabled and safe, downloaded by the worker through the
SSRF guard, failures classified, the download directory removed on every way out.

A real HTTP server on loopback serves the media; runs happen in this process against the
real PostgreSQL with real ffmpeg.
"""
from __future__ import annotations

import ipaddress
import socket
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ffworker import worker
from tests.integration.test_ledger import new_job

pytestmark = pytest.mark.integration


class MediaServer:
    """Serves ``routes``: path → (status, headers, body)."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, dict, bytes]] = {}
        self.requests: list[str] = []
        # A request for a path in ``stall`` gets its headers and a first kilobyte, then
        # nothing until ``release`` is set: a server that stops sending.
        self.stall: set[str] = set()
        self.stalled = threading.Event()
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                server.requests.append(self.path)
                if self.path in server.stall:
                    self.send_response(200)
                    self.send_header("Content-Length", str(10 << 20))
                    self.end_headers()
                    self.wfile.write(b"x" * 1024)
                    self.wfile.flush()
                    server.stalled.set()
                    server.release.wait(60)
                    return
                status, headers, body = server.routes.get(self.path, (404, {}, b"not here"))
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        # A short poll: shutdown() at teardown waits up to one poll interval.
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def media_server():
    server = MediaServer()
    yield server
    server.close()


@pytest.fixture
def url_settings(settings):
    """URL inputs on, http allowed, the guard lifted: the server listens on loopback."""
    return settings.with_overrides(allow_url_inputs=True, allow_http_inputs=True, allow_private_urls=True)


@pytest.fixture
def url_app(settings):
    from ffworker.app import create_app

    app = create_app({"TESTING": True, "FFWORKER_SETTINGS": settings.with_overrides(
        allow_url_inputs=True, allow_http_inputs=True)})
    yield app
    app.extensions["ffworker_events"].hub.close()


def downloads_left(job_id) -> list[Path]:
    return list(Path(tempfile.gettempdir()).glob(f"ffworker-{job_id}.*"))


def transcode_of(url: str) -> dict:
    return {"input": url, "output": "out/small.mp4", "video": {"codec": "h264", "height": 120}}


# -- submit -------------------------------------------------------------------------------

SSRF_CORPUS = [
    "http://127.0.0.1/a.mp4", "http://localhost/a.mp4", "http://10.1.2.3/a.mp4", "http://192.168.0.1/a.mp4",
    "http://172.16.0.1/a.mp4", "http://[::1]/a.mp4", "http://[fd00::1]/a.mp4", "http://[fe80::1]/a.mp4",
    "http://169.254.169.254/latest/meta-data/", "http://[::ffff:127.0.0.1]/a.mp4", "http://0.0.0.0/a.mp4",
    "http://[::]/a.mp4", "http://2130706433/a.mp4", "http://0x7f.1/a.mp4", "http://100.100.100.200/a.mp4",
    "https://user:pw@example.com/a.mp4", "ftp://example.com/a.mp4", "file:///etc/passwd", "gopher://example.com/",
]


@pytest.mark.parametrize("url", SSRF_CORPUS)
def test_internal_and_odd_urls_are_refused_at_submit(url_app, make_tenant, url):
    tenant = make_tenant("acme")
    response = url_app.test_client().post("/v1/jobs", json={"kind": "transcode", **transcode_of(url)},
                                          headers=tenant.headers)
    assert response.status_code == 422, response.get_data(as_text=True)
    assert response.get_json()["errors"]["input"]


URL = "https://media.example.com/in/clip.mp4"


@pytest.mark.parametrize("body", [
    {"kind": "transcode", **transcode_of(URL)},
    {"kind": "probe", "input": URL},
    {"kind": "thumbnail", "input": URL, "output": "thumb.jpg"},
    {"kind": "hls", "input": URL, "output_dir": "ladder"},
    {"kind": "concat", "inputs": [URL, URL + "?part=2"], "output": "joined.mp4"},
], ids=lambda body: body["kind"])
def test_a_public_https_url_is_accepted_at_submit(url_app, make_tenant, purge_queue, body):
    tenant = make_tenant("acme")
    response = url_app.test_client().post("/v1/jobs", json=body, headers=tenant.headers)
    assert response.status_code == 202, response.get_data(as_text=True)


def test_url_inputs_are_off_by_default(client, tenant):
    response = client.post("/v1/jobs", json={"kind": "transcode", **transcode_of("https://media.example.com/a.mp4")},
                           headers=tenant.headers)
    assert response.status_code == 422
    assert "not enabled" in response.get_json()["errors"]["input"][0]


def test_http_needs_its_own_flag(settings, make_tenant):
    from ffworker.app import create_app

    app = create_app({"TESTING": True, "FFWORKER_SETTINGS": settings.with_overrides(allow_url_inputs=True)})
    try:
        tenant = make_tenant("acme")
        response = app.test_client().post(
            "/v1/jobs", json={"kind": "transcode", **transcode_of("http://media.example.com/a.mp4")},
            headers=tenant.headers)
        assert response.status_code == 422
        assert "https" in response.get_json()["errors"]["input"][0]
    finally:
        app.extensions["ffworker_events"].hub.close()


# -- the worker ---------------------------------------------------------------------------


def test_a_url_input_is_downloaded_through_a_redirect_and_transcoded(
        ledger, url_settings, tenant, make_clip, media_server, tmp_path):
    clip = make_clip(tmp_path / "clip.mp4").read_bytes()
    media_server.routes["/media/clip.mp4"] = (200, {"Content-Type": "video/mp4"}, clip)
    media_server.routes["/share/abc"] = (302, {"Location": "/media/clip.mp4"}, b"")
    job = new_job(ledger, tenant, kind="transcode", spec=transcode_of(media_server.url("/share/abc")))

    report = worker.run(job["id"], ledger, url_settings)

    row = ledger.get(job["id"])
    assert (report.outcome, row["status"]) == ("completed", "completed"), row["error_message"]
    assert (tenant.media / "out" / "small.mp4").stat().st_size > 0
    assert media_server.requests == ["/share/abc", "/media/clip.mp4"]
    assert downloads_left(job["id"]) == []


@pytest.mark.parametrize("route, max_bytes, status", [
    ((404, {}, b"gone"), None, "failed"),               # deterministic: failed at once
    ((403, {}, b"no"), None, "failed"),
    ((503, {}, b"busy"), None, "queued"),               # transient: queued again with backoff
    ((200, {}, b"x" * 5000), 4096, "failed"),           # over the size cap
])
def test_download_failures_are_input_unavailable(
        ledger, url_settings, tenant, media_server, route, max_bytes, status):
    media_server.routes["/a.mp4"] = route
    settings = url_settings.with_overrides(max_upload_bytes=max_bytes) if max_bytes else url_settings
    job = new_job(ledger, tenant, kind="transcode", spec=transcode_of(media_server.url("/a.mp4")))

    worker.run(job["id"], ledger, settings)

    row = ledger.get(job["id"])
    assert (row["status"], row["error_code"]) == (status, "input_unavailable"), row["error_message"]
    assert media_server.url("/a.mp4") in row["error_message"]
    assert downloads_left(job["id"]) == []


def test_more_than_three_redirects_fail(ledger, url_settings, tenant, media_server):
    for hop in range(5):
        media_server.routes[f"/r{hop}"] = (302, {"Location": f"/r{hop + 1}"}, b"")
    job = new_job(ledger, tenant, kind="transcode", spec=transcode_of(media_server.url("/r0")))

    worker.run(job["id"], ledger, url_settings)

    row = ledger.get(job["id"])
    assert (row["status"], row["error_code"]) == ("failed", "input_unavailable")
    assert "more than 3 redirects" in row["error_message"]
    assert media_server.requests == ["/r0", "/r1", "/r2", "/r3"]


def test_the_worker_refuses_a_name_that_resolves_to_an_internal_address(
        ledger, url_settings, tenant, media_server):
    # The machine's own host name is not refused by its spelling, only by what it resolves to.
    host = socket.gethostname()
    resolved = {info[4][0] for info in socket.getaddrinfo(host, None)}
    if not any(ipaddress.ip_address(a.split("%")[0]).is_private for a in resolved):
        pytest.skip(f"{host} does not resolve to an internal address here")
    guarded = url_settings.with_overrides(allow_private_urls=False)
    media_server.routes["/a.mp4"] = (200, {}, b"x" * 100)
    # Written as a row directly: submit refuses nothing about this name, the connection must.
    job = new_job(ledger, tenant, kind="transcode", spec=transcode_of(media_server.url("/a.mp4", host=host)))

    worker.run(job["id"], ledger, guarded)

    row = ledger.get(job["id"])
    assert (row["status"], row["error_code"]) == ("failed", "input_unavailable")
    assert "resolves to" in row["error_message"]
    assert media_server.requests == []


def test_a_redirect_to_an_internal_address_is_refused(ledger, url_settings, tenant, media_server, monkeypatch):
    # The first URL is public as written; its answer sends the worker inside.
    from ffworker import urlguard

    guarded = url_settings.with_overrides(allow_private_urls=False)
    real_open = urlguard.open_connection
    answers = iter([(302, "http://169.254.169.254/latest/meta-data/")])

    class Redirecting:
        def __init__(self, status, location):
            self.status, self.location = status, location

        def getheader(self, name, default=None):
            return self.location if name == "Location" else default

    class FakePublicServer:
        sock = None

        def request(self, *args, **kwargs):
            pass

        def getresponse(self):
            return Redirecting(*next(answers))

        def close(self):
            pass

    def open_connection(url, timeout_s, *, allow_private=False):
        if url.startswith("https://media.example.com/"):
            return FakePublicServer(), "/a.mp4"
        return real_open(url, timeout_s, allow_private=allow_private)

    monkeypatch.setattr(urlguard, "open_connection", open_connection)
    job = new_job(ledger, tenant, kind="transcode", spec=transcode_of("https://media.example.com/a.mp4"))

    worker.run(job["id"], ledger, guarded)

    row = ledger.get(job["id"])
    assert (row["status"], row["error_code"]) == ("failed", "input_unavailable")
    assert "redirected to 'http://169.254.169.254/latest/meta-data/'" in row["error_message"]
    assert "metadata" in row["error_message"]


def test_a_cancel_during_a_stalled_download_ends_the_run_at_once(ledger, url_settings, tenant, media_server):
    media_server.stall.add("/slow.mp4")
    job = new_job(ledger, tenant, kind="transcode", spec=transcode_of(media_server.url("/slow.mp4")))
    reports = []
    run = threading.Thread(target=lambda: reports.append(worker.run(job["id"], ledger, url_settings)))
    run.start()
    assert media_server.stalled.wait(30)
    cancelled_at = time.monotonic()
    ledger.request_cancel(job["id"], tenant.id)
    run.join(60)

    # Seen at the next heartbeat, not when the silent server's 30 s read timeout runs out.
    assert time.monotonic() - cancelled_at < 5
    assert [r.outcome for r in reports] == ["cancelled"] and ledger.get(job["id"])["status"] == "cancelled"
    assert downloads_left(job["id"]) == []


def test_a_stalled_download_ends_at_the_jobs_timeout(ledger, url_settings, tenant, media_server):
    media_server.stall.add("/slow.mp4")
    job = new_job(ledger, tenant, kind="transcode", spec=transcode_of(media_server.url("/slow.mp4")), timeout_s=2)
    started = time.monotonic()

    worker.run(job["id"], ledger, url_settings)

    row = ledger.get(job["id"])
    assert (row["status"], row["error_code"]) == ("failed", "timeout")
    assert time.monotonic() - started < 10
    assert downloads_left(job["id"]) == []
