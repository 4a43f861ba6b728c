"""The dashboard in a real browser (Debian's chromium driven by Playwright) against a real
gunicorn web process and a real worker running ffmpeg.

Screenshots of each page are saved under this run's temporary directory (the path is
printed at the end of the module).
"""
from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner
from sqlalchemy import text

from ffworker.cli import cli
from tests.helpers import ffmpeg_processes_touching, gunicorn, make_celery_current, wait_until

pytestmark = pytest.mark.e2e

import playwright.sync_api as playwright_api  # noqa: E402  (test extras)
expect = playwright_api.expect

# Debian's chromium, which scripts/bootstrap.sh installs: Playwright's own browser download is
# not possible here.
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def web(settings, tmp_path_factory):
    """One gunicorn process as the Procfile starts it; closed pages free their stream slot at
    the next keep-alive, so keep-alives are frequent here."""
    env = {"FFWORKER_SSE_KEEPALIVE_S": "1", "FFWORKER_WEB_THREADS": "16"}
    with gunicorn(tmp_path_factory.mktemp("web") / "gunicorn.log", env) as (url, _):
        yield url


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (scripts/bootstrap.sh does)")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    directory = tmp_path_factory.mktemp("screenshots")
    yield directory
    print(f"\ndashboard screenshots: {directory}")


@pytest.fixture
def page(browser, web):
    context = browser.new_context(base_url=web, viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(10_000)
    yield page
    context.close()


def sign_in(page, key: str) -> None:
    page.goto("/ui/login")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/ui/jobs")


def submit(web, tenant, body: dict) -> dict:
    response = requests.post(f"{web}/v1/jobs", json=body, headers=tenant.headers, timeout=10)
    assert response.status_code == 202, response.text
    return response.json()


def row(page, job_id):
    return page.locator(f'tr[data-job-id="{job_id}"]')


def progress_value(locator) -> float | None:
    value = locator.get_attribute("aria-valuenow")
    return float(value) if value is not None else None


def test_a_submitted_job_appears_advances_and_completes_without_reload(page, web, worker, tenant, make_clip, shots):
    make_clip(tenant.media / "in.mp4", seconds=4, size="640x360")
    sign_in(page, tenant.key)
    page.evaluate("window.__sameDocument = true")
    page.screenshot(path=shots / "jobs-empty.png", full_page=True)

    job = submit(web, tenant, {"kind": "transcode", "input": "in.mp4", "output": "out/big.mp4",
                               "video": {"codec": "h264", "height": 720, "preset": "slow"}, "audio": {"codec": "aac"}})
    submitted = time.monotonic()
    expect(row(page, job["id"])).to_be_visible(timeout=2_000)
    assert time.monotonic() - submitted < 2.0

    bar = row(page, job["id"]).get_by_role("progressbar")
    page.wait_for_function(
        """id => { const v = document.querySelector(`tr[data-job-id="${id}"] [role=progressbar]`)
                    ?.getAttribute('aria-valuenow'); return v !== null && v !== undefined && +v > 0 && +v < 100; }""",
        arg=job["id"], timeout=30_000, polling=100)
    first = progress_value(bar)
    page.screenshot(path=shots / "jobs-running.png", full_page=True)
    page.wait_for_function(
        """([id, first]) => { const v = document.querySelector(`tr[data-job-id="${id}"] [role=progressbar]`)
                               ?.getAttribute('aria-valuenow'); return v !== null && +v > first; }""",
        arg=[job["id"], first], timeout=30_000, polling=100)
    assert progress_value(bar) > first

    expect(row(page, job["id"]).locator(".status")).to_have_text("completed", timeout=60_000)
    assert progress_value(row(page, job["id"]).get_by_role("progressbar")) == 100
    assert page.evaluate("window.__sameDocument") is True  # never reloaded
    page.screenshot(path=shots / "jobs-completed.png", full_page=True)

    page.goto(f"/ui/jobs/{job['id']}")
    expect(page.get_by_text("out/big.mp4", exact=True)).to_be_visible()
    page.screenshot(path=shots / "job-completed.png", full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto("/ui/jobs")
    page.screenshot(path=shots / "jobs-phone.png", full_page=True)


def test_cancel_from_the_job_page_ends_the_job_cancelled_and_kills_ffmpeg(page, web, worker, ledger, tenant,
                                                                         make_clip, shots):
    make_clip(tenant.media / "long.mp4", seconds=8, size="640x360")
    job = submit(web, tenant, {"kind": "transcode", "input": "long.mp4", "output": "never.mp4",
                               "video": {"codec": "h264", "height": 1080, "preset": "veryslow"}})
    sign_in(page, tenant.key)
    page.goto(f"/ui/jobs/{job['id']}")
    expect(page.locator("#summary .status")).to_have_text("running", timeout=30_000)
    wait_until(lambda: ffmpeg_processes_touching(job["id"]), 10)
    page.wait_for_function("() => document.getElementById('chart-line').getAttribute('points').includes(',')",
                           timeout=30_000, polling=100)
    page.screenshot(path=shots / "job-running.png", full_page=True)

    page.get_by_role("button", name="Cancel").click()
    expect(page.locator("#summary .status")).to_have_text("cancelled", timeout=5_000)
    assert ledger.get(job["id"])["status"] == "cancelled"
    wait_until(lambda: not ffmpeg_processes_touching(job["id"]), 5)
    expect(page.locator("#trail")).to_contain_text("cancel requested")
    page.screenshot(path=shots / "job-cancelled.png", full_page=True)


def test_another_tenants_job_is_the_same_not_found_page_as_a_made_up_id(page, ledger, tenant, other_tenant, shots):
    theirs, _ = ledger.create(tenant_id=other_tenant.id, kind="probe", spec={"input": "x.mp4"}, workspace="default",
                              priority=0, metadata={}, max_attempts=1, timeout_s=60)
    sign_in(page, tenant.key)
    bodies = []
    for job_id in (theirs["id"], uuid.uuid4()):
        response = page.goto(f"/ui/jobs/{job_id}")
        assert response.status == 404
        bodies.append(page.locator("main").inner_html())
    assert bodies[0] == bodies[1] and "Job not found" in bodies[0]
    page.screenshot(path=shots / "not-found.png", full_page=True)


def test_an_action_posted_without_the_csrf_token_is_refused_and_changes_nothing(page, engine, ledger, tenant):
    job, _ = ledger.create(tenant_id=tenant.id, kind="probe", spec={"input": "x.mp4"}, workspace="default",
                           priority=0, metadata={}, max_attempts=1, timeout_s=60)  # not dispatched: stays queued
    sign_in(page, tenant.key)
    with engine.connect() as conn:
        events_before = conn.execute(text("SELECT count(*) FROM job_events")).scalar()
    # The browser's own cookies (page.request shares them), a form without the token.
    response = page.request.post(f"/ui/jobs/{job['id']}/cancel", form={"reason": "x"}, max_redirects=0)
    assert response.status == 403
    response = page.request.post(f"/ui/jobs/{job['id']}/cancel", form={"csrf_token": "wrong"}, max_redirects=0)
    assert response.status == 403
    assert ledger.get(job["id"])["status"] == "queued"
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM job_events")).scalar() == events_before


def test_an_operator_sees_both_tenants_and_bulk_retries_exactly_the_20_failed_jobs(
        app, page, engine, ledger, tenant, other_tenant, shots):
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM operators"))
    result = CliRunner().invoke(cli, ["operators", "create", "olga"])
    make_celery_current(app)
    assert result.exit_code == 0, result.output
    operator_key = result.output.strip().splitlines()[-1]

    failed = []
    for index in range(20):
        owner = (tenant, other_tenant)[index % 2]
        job, _ = ledger.create(tenant_id=owner.id, kind="probe", spec={"input": f"gone-{index}.mp4"},
                               workspace="default", priority=0, metadata={}, max_attempts=1, timeout_s=60)
        claim = ledger.claim(job["id"], "lost-host:1")
        ledger.fail(job["id"], claim.token, code="invalid_input", message="input vanished")
        failed.append(job["id"])
    completed, _ = ledger.create(tenant_id=tenant.id, kind="probe", spec={"input": "ok.mp4"}, workspace="default",
                                 priority=0, metadata={}, max_attempts=1, timeout_s=60)
    ledger.complete(completed["id"], ledger.claim(completed["id"], "w:1").token, {"outputs": []})

    sign_in(page, operator_key)
    cells = page.locator("table.jobs tbody td[data-label=Tenant]").all_inner_texts()
    assert {"acme", "globex"} <= set(cells)
    page.screenshot(path=shots / "jobs-operator.png", full_page=True)
    page.goto("/ui/overview")
    expect(page.get_by_role("heading", name="Per tenant and kind")).to_be_visible()
    page.screenshot(path=shots / "overview.png", full_page=True)

    page.goto("/ui/jobs?status=failed")
    page.get_by_role("link", name="Retry all matching").click()
    expect(page.locator("#count")).to_have_text("20")
    page.screenshot(path=shots / "confirm-retry.png", full_page=True)
    page.get_by_role("button", name="Retry all matching").click()
    expect(page.locator("#done")).to_have_text("Re-queued 20 jobs.")
    page.screenshot(path=shots / "done.png", full_page=True)

    with engine.connect() as conn:
        retried = conn.execute(text(
            "SELECT job_id FROM job_events WHERE reason = 'retried by request'")).scalars().all()
    assert sorted(map(str, retried)) == sorted(map(str, failed))
    assert ledger.get(completed["id"])["status"] == "completed"
