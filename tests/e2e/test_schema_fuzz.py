"""Schema fuzzing: schemathesis against the running web process's `/openapi.json`, with a valid
key; once with the job ids it generates (absent jobs) and once with a real, completed job.

No response may be a 5xx, and every response must conform to the document: its status code,
its content type (the event stream is `text/event-stream`), its body schema, and a 405 with an
`Allow` header for a method an operation does not have. The example budget and the seed are
fixed, so the run is the same every time and stays well under a minute.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.e2e.test_sse_server import web  # noqa: F401  (the gunicorn fixture)
from tests.e2e.test_worker import submit

pytestmark = pytest.mark.e2e

CHECKS = ",".join([
    "not_a_server_error", "status_code_conformance", "content_type_conformance",
    "response_schema_conformance", "unsupported_method", "allow_header_conformance",
])
EXAMPLES = 25
SEED = 20261129


def fuzz(url: str, tenant, tmp_path, name: str, config: str = "") -> subprocess.CompletedProcess:
    config_file = tmp_path / f"{name}.toml"
    config_file.write_text(config)
    return subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config_file), "run",
         f"{url}/openapi.json", "--url", url,
         "-H", f"Authorization: Bearer {tenant.key}", "--checks", CHECKS,
         "--phases", "examples,coverage,fuzzing", "--max-examples", str(EXAMPLES), "--seed", str(SEED),
         "--workers", "1", "--request-timeout", "10", "--no-shrink", "--max-failures", "20"],
        capture_output=True, text=True, timeout=240, cwd=tmp_path)  # its caches stay out of the work tree


@pytest.fixture
def completed_job(client, ledger, tenant, make_clip, purge_queue):
    """A job that ran to completion (written through the ledger: no worker is needed)."""
    make_clip(tenant.media / "in.mp4", seconds=1.0)
    job = submit(client, tenant, kind="transcode", input="in.mp4", output="out.mp4", preset="h264-360p")
    claim = ledger.claim(job["id"], "fuzz-worker")
    ledger.complete(job["id"], claim.token, {"outputs": [{
        "path": "out.mp4", "size_bytes": 1000, "duration_s": 1.0, "format": "mp4", "width": 480, "height": 360,
        "video_codec": "h264", "audio_codec": "aac", "bit_rate": 8000}]})
    return job["id"]


def test_the_api_conforms_to_its_openapi_document(web, tenant, completed_job, tmp_path):  # noqa: F811
    url, _ = web
    for name, config in (("generated-ids", ""), ("real-job", f'[parameters]\njob_id = "{completed_job}"\n')):
        done = fuzz(url, tenant, tmp_path, name, config)
        report = readable(done.stdout)
        print(report[-2500:])
        assert done.returncode == 0, f"{name}:\n{report[-6000:]}\n{done.stderr[-2000:]}"


def readable(output: str) -> str:
    """schemathesis's report with each line cut short: a generated query string can be kilobytes
    long and would push the failure itself out of the assertion message."""
    return "\n".join(line if len(line) < 300 else line[:300] + " …" for line in output.splitlines())


def test_a_method_not_allowed_names_the_allowed_ones(client, tenant):
    response = client.open("/v1/jobs", method="TRACE", headers=tenant.headers)
    assert response.status_code == 405
    assert set(response.headers["Allow"].replace(" ", "").split(",")) >= {"GET", "POST"}
    assert response.json["message"]
