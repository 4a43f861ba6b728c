"""`manage.py submit --wait` and `manage.py jobs watch` follow a real job through its event stream."""
from __future__ import annotations

import json
import threading
import uuid

import pytest
from click.testing import CliRunner
from werkzeug.serving import WSGIRequestHandler, make_server

from ffworker.cli import cli
from ffworker.client import Client

pytestmark = pytest.mark.e2e


class Http11Handler(WSGIRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def api_url(app):
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=Http11Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(5)


def run(*args) -> object:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_submit_wait_shows_progress_and_prints_the_finished_job(api_url, worker, tenant, make_clip):
    make_clip(tenant.media / "in.mp4", seconds=2, size="640x360")
    result = run("submit", "transcode", "--input", "in.mp4", "--output", f"out/cli-{uuid.uuid4().hex[:8]}.mp4", "--preset", "h264-360p",
                 "--wait", "--api", api_url, "--key", tenant.key)
    assert result.exit_code == 0, result.output
    job = json.loads(result.stdout)
    assert job["status"] == "completed" and job["result"]["outputs"][0]["height"] == 360
    assert "completed" in result.stderr and "100%" in result.stderr


def test_jobs_watch_follows_a_job_to_its_end_and_fails_the_command_when_it_fails(api_url, worker, tenant):
    (tenant.media / "broken.mp4").write_bytes(b"not a video" * 50)
    job = Client(api_url, tenant.key).submit({"kind": "probe", "input": "broken.mp4"})
    result = run("jobs", "watch", job["id"], "--api", api_url, "--key", tenant.key)
    assert result.exit_code == 0, result.output
    watched = json.loads(result.stdout)
    assert watched["id"] == job["id"] and watched["status"] == "failed"
    assert watched["error"]["code"] == "invalid_input"
    assert "failed" in result.stderr

    waited = run("submit", "probe", "--input", "broken.mp4", "--wait", "--api", api_url, "--key", tenant.key)
    assert waited.exit_code == 1
    assert json.loads(waited.stdout)["status"] == "failed"


def test_watching_another_tenants_job_is_an_error(api_url, tenant, other_tenant, ledger):
    job, _ = ledger.create(tenant_id=tenant.id, kind="probe", spec={"input": "a.mp4"}, workspace="default",
                           priority=0, metadata={}, max_attempts=3, timeout_s=60)
    result = run("jobs", "watch", str(job["id"]), "--api", api_url, "--key", other_tenant.key)
    assert result.exit_code == 1
    assert "HTTP 404" in result.output
