"""Webhooks through real Celery worker processes: prompt delivery after the transition commits,
a sender killed mid-delivery, a flushed broker, and 100 jobs completing at once."""
from __future__ import annotations

import threading

import pytest
from sqlalchemy import text
from standardwebhooks import Webhook

from ffworker import webhooks
from ffworker.maintenance import webhook_relay
from ffworker.tenants import set_limits
from tests.conftest import WorkerProcess
from tests.e2e.test_worker import finished, submit
from tests.helpers import wait_until

pytestmark = pytest.mark.e2e

PRIVATE_OK = {"FFWORKER_ALLOW_PRIVATE_URLS": "1"}


def webhooks_queue(settings) -> str:
    return f"{settings.task_queue}.webhooks"


def purge(app, settings) -> None:
    with app.extensions["celery"].connection_for_write() as conn:
        for queue in (settings.task_queue, webhooks_queue(settings)):
            try:
                conn.default_channel.queue_purge(queue)
            except Exception:
                pass


@pytest.fixture
def start_worker(settings, app, tmp_path):
    """start_worker(): a worker consuming the job and webhooks queues (its relay listener included)."""
    started: list[WorkerProcess] = []
    purge(app, settings)

    def start(name: str = "wh") -> WorkerProcess:
        process = WorkerProcess(settings, tmp_path / f"{name}-{len(started)}.log", name=f"{name}{len(started)}",
                                queues=[settings.task_queue, webhooks_queue(settings)], env=PRIVATE_OK)
        started.append(process)
        wait_until(lambda: b"event=webhook_listener_started" in process.log_path.read_bytes(), 10)
        return process

    yield start
    for process in started:
        process.terminate_group()
    purge(app, settings)


def add_endpoint(client, tenant, url, events) -> dict:
    response = client.post("/v1/webhooks", json={"url": url, "events": events}, headers=tenant.headers)
    assert response.status_code == 201, response.json
    return response.json


def new_job(ledger, tenant) -> dict:
    row, _ = ledger.create(tenant_id=tenant.id, kind="probe", spec={"input": "a.mp4"}, workspace="default",
                           priority=0, metadata={}, max_attempts=3, timeout_s=60)
    return row


def complete(ledger, job_id) -> None:
    claim = ledger.claim(job_id, "host-t:1")
    ledger.complete(job_id, claim.token, {"outputs": []})


def delivery_rows(engine) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(text("SELECT * FROM webhook_deliveries ORDER BY created_at"))
                .mappings()]


def test_a_real_job_is_delivered_signed_to_its_endpoint_and_its_own_url(
        start_worker, client, tenant, engine, make_clip, private_ok, receiver):
    start_worker()
    make_clip(tenant.media / "in.mp4", seconds=1)
    add_endpoint(client, tenant, receiver.url("/endpoint"), ["job.started", "job.completed"])
    secret = client.get("/v1/webhooks/secret", headers=tenant.headers).json["secret"]
    job = submit(client, tenant, kind="probe", input="in.mp4", webhook_url=receiver.url("/job"))
    done = finished(client, tenant, job["id"])
    assert done["status"] == "completed"
    got = receiver.wait_for(3, 30)
    assert sorted((r.path, r.json["type"]) for r in got) == [
        ("/endpoint", "job.completed"), ("/endpoint", "job.started"), ("/job", "job.completed")]
    for request in got:
        assert Webhook(secret).verify(request.body, request.headers)["data"]["id"] == job["id"]
    completed = [r.json for r in got if r.json["type"] == "job.completed"]
    assert completed[0]["data"] == completed[1]["data"] == done
    assert "/" + str(tenant.media).lstrip("/") not in got[0].body.decode()  # no server paths
    wait_until(lambda: {r["status"] for r in delivery_rows(engine)} == {"delivered"}, 10)


def test_a_sender_killed_mid_delivery_is_replaced_and_the_delivery_arrives_with_the_same_id(
        start_worker, app, client, tenant, ledger, engine, private_ok, receiver):
    receiver.hold.set()  # the first attempt is read and never answered
    first = start_worker("victim")
    add_endpoint(client, tenant, receiver.url(), ["job.completed"])
    complete(ledger, new_job(ledger, tenant)["id"])
    receiver.wait_for(1, 30)
    first.kill()
    receiver.hold.clear()
    receiver.released.set()
    (row,) = delivery_rows(engine)
    assert row["status"] == "pending" and row["lease_until"] is not None

    # The lease runs out (backdated rather than waited for); a new worker's relay sends it again.
    with engine.begin() as conn:
        conn.execute(text("UPDATE webhook_deliveries SET lease_until = now() - interval '1 s'"))
    start_worker("survivor")
    got = receiver.wait_for(2, 30)
    assert got[0].webhook_id == got[1].webhook_id == row["webhook_id"]
    wait_until(lambda: delivery_rows(engine)[0]["status"] == "delivered", 10)
    log = client.get("/v1/webhooks/deliveries", headers=tenant.headers).json["deliveries"][0]
    assert [(a["error_class"], a["status_code"]) for a in log["attempts"]] == [("interrupted", None), (None, 200)]


def test_a_flushed_broker_delays_a_delivery_but_never_loses_it(
        start_worker, app, settings, client, tenant, ledger, engine, private_ok, receiver):
    add_endpoint(client, tenant, receiver.url(), ["job.completed"])
    complete(ledger, new_job(ledger, tenant)["id"])
    # No worker runs until the message has been lost and published again: a worker's relay
    # listener, which starts its rounds at some moment after the worker reports ready, would
    # otherwise race beat's relay for the backdated delivery.
    with app.app_context():
        assert webhook_relay.task() == 1  # published (no worker consumes it yet)
    purge(app, settings)  # … and the message is lost
    with app.app_context():
        assert webhook_relay.task() == 0  # published recently: not yet counted as lost
    with engine.begin() as conn:
        conn.execute(text("UPDATE webhook_deliveries SET published_at = now() - interval '31 s'"))
    with app.app_context():
        assert webhook_relay.task() == 1
    assert receiver.received == []
    start_worker()
    (got,) = receiver.wait_for(1, 30)
    assert got.webhook_id == delivery_rows(engine)[0]["webhook_id"]
    wait_until(lambda: delivery_rows(engine)[0]["status"] == "delivered", 10)


def test_100_jobs_completing_at_once_make_exactly_100_deliveries_per_endpoint(
        start_worker, client, tenant, ledger, engine, private_ok, receiver):
    start_worker()
    set_limits(engine, tenant.name, slots=10)  # ten runs at once: room in the tenant's running slots
    endpoints = [add_endpoint(client, tenant, receiver.url(f"/e{n}"), ["job.completed"]) for n in range(2)]
    add_endpoint(client, tenant, receiver.url("/started"), ["job.started"])
    jobs = [str(new_job(ledger, tenant)["id"]) for _ in range(100)]
    errors = []

    def run(chunk):
        try:
            for job_id in chunk:
                complete(ledger, job_id)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(jobs[i::10],)) for i in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    got = receiver.wait_for(300, 120)
    for n, endpoint in enumerate(endpoints):
        ids = [r.webhook_id for r in got if r.path == f"/e{n}"]
        assert len(ids) == len(set(ids)) == 100
        assert sorted(r.json["data"]["id"] for r in got if r.path == f"/e{n}") == sorted(jobs)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM webhook_deliveries WHERE endpoint_id = :id"),
                                {"id": endpoint["id"]}).scalar() == 100
    assert len([r for r in got if r.path == "/started"]) == 100
    wait_until(lambda: {r["status"] for r in delivery_rows(engine)} == {"delivered"}, 30)
    assert len(receiver.received) == 300


def test_the_relay_statement_publishes_each_due_delivery_once_under_concurrency(app, client, tenant, ledger, engine,
                                                                                private_ok, settings):
    add_endpoint(client, tenant, "http://127.0.0.1:9/x", ["job.completed"])
    for _ in range(20):
        complete(ledger, new_job(ledger, tenant)["id"])
    celery = app.extensions["celery"]
    counts = []
    barrier = threading.Barrier(4)

    def relay():
        barrier.wait()
        counts.append(webhook_relay.publish_due(engine, celery, webhooks_queue(settings)))

    threads = [threading.Thread(target=relay) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(counts) == 20
    purge(app, settings)
    assert webhooks.list_deliveries(engine, tenant.id, limit=50)[0]["status"] == "pending"
