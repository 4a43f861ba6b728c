"""/metrics moves when a real worker runs a real job (the numbers come from the ledger,
whichever process ran it)."""
from __future__ import annotations

import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import wait_until

pytestmark = pytest.mark.e2e


def scrape(client) -> dict:
    body = client.get("/metrics").get_data(as_text=True)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def delta(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_counters_and_histograms_move_after_a_job(worker, client, tenant, make_clip):
    make_clip(tenant.media / "in.mp4", seconds=2, size="320x240")
    before = scrape(client)
    response = client.post("/v1/jobs", headers=tenant.headers, json={
        "kind": "transcode", "input": "in.mp4", "output": f"out/metrics-{uuid.uuid4().hex[:8]}.mp4", "preset": "h264-360p", "workspace": "ci"})
    assert response.status_code == 202
    job_id = response.json["id"]

    def finished():
        job = client.get(f"/v1/jobs/{job_id}", headers=tenant.headers).json
        return job if job["status"] in ("completed", "failed", "cancelled") else None

    done = wait_until(finished, 60, interval_s=0.1)
    assert done["status"] == "completed", done
    after = scrape(client)

    labels = {"tenant": "acme", "workspace": "ci", "kind": "transcode"}
    assert delta(before, after, "ffworker_jobs_created_total", **labels) == 1
    assert delta(before, after, "ffworker_jobs_finished_total", status="completed", **labels) == 1
    assert delta(before, after, "ffworker_job_queue_wait_seconds_count", kind="transcode") == 1
    assert delta(before, after, "ffworker_job_run_seconds_count", kind="transcode", outcome="completed") == 1
    assert delta(before, after, "ffworker_job_run_seconds_sum", kind="transcode", outcome="completed") > 0
    assert delta(before, after, "ffworker_ffmpeg_speed_ratio_count", kind="transcode") == 1
    assert delta(before, after, "ffworker_media_processed_seconds_total", tenant="acme", kind="transcode") == \
        pytest.approx(2.0, abs=0.1)
    assert after[("ffworker_jobs_running", (("kind", "transcode"),))] == 0
    assert after[("ffworker_jobs_queued", (("kind", "transcode"),))] == 0


def test_every_worker_line_about_a_job_names_it(worker, client, tenant, make_clip):
    make_clip(tenant.media / "log.mp4", seconds=1)
    response = client.post("/v1/jobs", headers=tenant.headers,
                           json={"kind": "thumbnail", "input": "log.mp4", "output": f"log-{uuid.uuid4().hex[:8]}.jpg"})
    job_id = response.json["id"]

    def logged():
        lines = [line for line in worker.log_path.read_text().splitlines() if job_id in line]
        return lines if any("succeeded" in line for line in lines) else None

    lines = wait_until(logged, 30)
    assert any(f"job={job_id} attempt=1 event=claimed" in line for line in lines)
    assert any(f"job={job_id} attempt=1 event=completed" in line for line in lines)
    # Celery's own line about the task names the job too
    assert any("Task ffworker.run_job[" in line and line.endswith(f"job={job_id}") for line in lines), lines
