"""Fair share in the ledger: which job a claim takes, the limits it enforces (also under a
race of many claimers), the usage counters, ``waiting``, ``GET /v1/limits``, batch
submission and ``manage.py tenants set-limits``."""
from __future__ import annotations

import threading
from collections import Counter

import pytest
from sqlalchemy import text

from ffworker.errors import NotClaimable
from ffworker.ledger import Ledger
from ffworker.tenants import set_limits
from tests.integration.test_ledger import backdate, new_job


def claim_next(ledger, worker="w"):
    try:
        return ledger.claim_next(worker).job
    except NotClaimable as exc:
        assert exc.reason == "none_eligible"
        return None


def usage(engine) -> dict:
    with engine.connect() as conn:
        return {row.name: (row.running_jobs, row.running_slots) for row in conn.execute(text(
            "SELECT t.name, u.running_jobs, u.running_slots FROM tenant_usage u JOIN tenants t ON t.id = u.tenant_id"))}


def recomputed(engine) -> dict:
    with engine.connect() as conn:
        return {row.name: (row.jobs, row.slots) for row in conn.execute(text(
            "SELECT t.name, count(j.id) AS jobs, coalesce(sum(j.slots), 0) AS slots FROM tenants t "
            "LEFT JOIN jobs j ON j.tenant_id = t.id AND j.status = 'running' GROUP BY t.name"))}


def test_priority_first_then_the_tenant_using_least_of_its_slots_then_turns_then_oldest(engine, ledger, tenant, other_tenant):
    old = new_job(ledger, tenant)
    newer = new_job(ledger, tenant)
    urgent = new_job(ledger, other_tenant, priority=100)
    theirs = new_job(ledger, other_tenant)
    assert claim_next(ledger)["id"] == urgent["id"]           # priority beats age and tenants
    # other_tenant now uses 1 of 5 slots, tenant 0: tenant goes first, its oldest job first.
    assert claim_next(ledger)["id"] == old["id"]
    # Both use 1 of 5: the tenant served least recently goes first, though its job is younger.
    assert claim_next(ledger)["id"] == theirs["id"]
    assert claim_next(ledger)["id"] == newer["id"]
    assert claim_next(ledger) is None


def test_the_fraction_is_of_each_tenants_own_allowance(engine, ledger, tenant, other_tenant):
    set_limits(engine, tenant.name, slots=10)
    set_limits(engine, other_tenant.name, slots=2)
    for _ in range(2):
        ledger.claim(new_job(ledger, tenant)["id"], "w")        # 2 of 10: a fifth
    ledger.claim(new_job(ledger, other_tenant)["id"], "w")      # 1 of 2: a half
    theirs = new_job(ledger, other_tenant)
    mine = new_job(ledger, tenant)
    assert theirs["created_at"] < mine["created_at"]
    assert claim_next(ledger)["id"] == mine["id"]


def test_a_tenant_never_exceeds_its_slots_and_a_big_job_runs_alone(engine, ledger, tenant):
    set_limits(engine, tenant.name, slots=3)
    probes = [new_job(ledger, tenant) for _ in range(4)]
    assert [claim_next(ledger)["id"] for _ in range(3)] == [p["id"] for p in probes[:3]]
    assert claim_next(ledger) is None
    assert ledger.get(probes[3]["id"])["waiting"] == "tenant_limit"
    hls = new_job(ledger, tenant, kind="hls", slots=5)          # more than the tenant's 3 slots
    for probe in probes[:3]:
        run = ledger.get(probe["id"])
        ledger.complete(probe["id"], run["attempts"], {})
    # The 4th probe is older: it runs; the HLS job waits until the tenant runs nothing, then runs alone.
    assert claim_next(ledger)["id"] == probes[3]["id"]
    assert claim_next(ledger) is None
    ledger.complete(probes[3]["id"], 1, {})
    assert claim_next(ledger)["id"] == hls["id"]
    assert usage(engine)[tenant.name] == (1, 5)
    later = new_job(ledger, tenant)
    assert claim_next(ledger) is None and ledger.get(later["id"])["waiting"] == "tenant_limit"


def test_within_a_tenant_a_later_small_job_does_not_overtake_a_waiting_big_one(engine, ledger, tenant):
    set_limits(engine, tenant.name, slots=3)
    running = ledger.claim(new_job(ledger, tenant, kind="transcode", slots=2)["id"], "w")
    big = new_job(ledger, tenant, kind="transcode", slots=2)
    new_job(ledger, tenant)                                     # would fit, but comes after the big one
    assert claim_next(ledger) is None
    ledger.complete(running.job["id"], running.token, {})
    assert claim_next(ledger)["id"] == big["id"]


def test_the_global_limit(engine, app, tenant, other_tenant):
    limited = Ledger(engine, max_running=2)
    for owner in (tenant, other_tenant, tenant):
        new_job(limited, owner)
    assert claim_next(limited) and claim_next(limited)
    assert claim_next(limited) is None
    waiting = limited.list(tenant.id, limit=10, status="queued")
    assert [row["waiting"] for row in waiting] == ["global_limit"]


def test_the_rate_limit_counts_starts_in_a_sliding_minute(engine, ledger, tenant):
    set_limits(engine, tenant.name, slots=10, rate=2)
    jobs = [new_job(ledger, tenant) for _ in range(3)]
    first, second = ledger.claim_next("w"), ledger.claim_next("w")
    ledger.complete(first.job["id"], first.token, {})
    ledger.complete(second.job["id"], second.token, {})
    assert claim_next(ledger) is None                           # nothing runs, yet two started this minute
    assert ledger.get(jobs[2]["id"])["waiting"] == "rate_limit"
    with engine.begin() as conn:                                # the first start leaves the window
        conn.execute(text("UPDATE tenant_usage SET recent_starts[1] = now() - interval '61 seconds' "
                          "WHERE tenant_id = :t"), {"t": tenant.id})
    assert claim_next(ledger)["id"] == jobs[2]["id"]


def test_backoff_is_the_first_reason_and_running_jobs_have_none(engine, ledger, tenant):
    job = new_job(ledger, tenant)
    assert ledger.get(job["id"])["waiting"] == "workers_busy"
    with engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET run_after = now() + interval '1 minute' WHERE id = :id"), {"id": job["id"]})
    assert ledger.get(job["id"])["waiting"] == "backoff"
    backdate(engine, job["id"], run_after=1)
    ledger.claim_next("w")
    assert ledger.get(job["id"])["waiting"] is None


def test_usage_counters_follow_every_way_out_of_running(engine, ledger, tenant, other_tenant):
    from ffworker.maintenance.reaper import reap

    set_limits(engine, tenant.name, slots=20)
    runs = [ledger.claim(new_job(ledger, tenant, kind="transcode", slots=2)["id"], "w") for _ in range(5)]
    ledger.claim(new_job(ledger, other_tenant)["id"], "w")
    assert usage(engine) == recomputed(engine) == {tenant.name: (5, 10), other_tenant.name: (1, 1)}
    ledger.complete(runs[0].job["id"], runs[0].token, {})
    ledger.fail(runs[1].job["id"], runs[1].token, code="io", message="x", retryable=True)   # back to queued
    ledger.fail(runs[2].job["id"], runs[2].token, code="bad", message="x")                  # failed
    ledger.request_cancel(runs[3].job["id"], tenant.id)
    ledger.record_cancelled(runs[3].job["id"], runs[3].token)
    backdate(engine, runs[4].job["id"], heartbeat_at=600)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO maintenance_state (name, last_run_at) VALUES ('reaper', now()) "
                          "ON CONFLICT (name) DO UPDATE SET last_run_at = now(), armed_at = NULL"))
    assert reap(ledger, stale_after_s=60, grace_s=120).status == "reaped"
    assert usage(engine) == recomputed(engine) == {tenant.name: (0, 0), other_tenant.name: (1, 1)}
    with engine.connect() as conn:
        assert conn.execute(text("SELECT running_jobs FROM fleet_usage")).scalar_one() == 1


def test_racing_claimers_never_exceed_a_limit(engine, ledger, tenant, other_tenant):
    """16 threads claim and complete as fast as they can: sampled under the same lock the
    claims take, the running slots never exceed a limit."""
    set_limits(engine, tenant.name, slots=3)
    set_limits(engine, other_tenant.name, slots=2)
    racing = Ledger(engine, max_running=4)
    for owner in (tenant, other_tenant):
        for n in range(40):
            new_job(racing, owner, **({"kind": "transcode", "slots": 2} if n % 3 == 0 else {}))
    peaks: Counter = Counter()
    stop = threading.Event()
    errors = []

    def claimer():
        try:
            while not stop.is_set():
                try:
                    run = racing.claim_next("w")
                except NotClaimable:
                    with engine.connect() as conn:
                        left = conn.execute(text("SELECT count(*) FROM jobs WHERE status = 'queued'")).scalar()
                    if not left:
                        return
                    continue
                with engine.connect() as conn:
                    rows = conn.execute(text(
                        "SELECT tenant_id, sum(slots), count(*) FROM jobs WHERE status = 'running' "
                        "GROUP BY tenant_id")).all()
                for tenant_id, slots, _ in rows:
                    peaks[tenant_id] = max(peaks[tenant_id], slots)
                peaks["fleet"] = max(peaks["fleet"], sum(row[2] for row in rows))
                racing.complete(run.job["id"], run.token, {})
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=claimer) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    stop.set()
    assert not errors
    assert peaks[tenant.id] <= 3 and peaks[other_tenant.id] <= 2 and peaks["fleet"] <= 4
    assert peaks["fleet"] >= 2  # they did race
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM jobs WHERE status = 'completed'")).scalar() == 80
    assert usage(engine) == recomputed(engine)


# -- the API ----------------------------------------------------------------------


def test_get_limits_shows_the_tenants_limits_and_use(client, engine, ledger, tenant, other_tenant):
    set_limits(engine, tenant.name, slots=4, rate=30)
    ledger.claim(new_job(ledger, tenant, kind="transcode", slots=2)["id"], "w")
    new_job(ledger, tenant)
    ledger.claim(new_job(ledger, other_tenant)["id"], "w")
    body = client.get("/v1/limits", headers=tenant.headers).json
    assert body["slots"] == {"limit": 4, "default": False, "used": 2}
    assert body["rate_per_min"] == {"limit": 30, "started_last_60s": 1}
    assert body["running_jobs"] == 1 and body["queued_jobs"] == 1
    assert body["fleet"] == {"max_running": None, "running_jobs": 2}
    assert body["kind_slots"]["transcode"] == 2
    theirs = client.get("/v1/limits", headers=other_tenant.headers).json
    assert theirs["slots"] == {"limit": 5, "default": True, "used": 1}
    assert client.get("/v1/limits").status_code == 401


def test_the_job_shows_its_slots_and_why_it_waits(client, engine, tenant, make_clip):
    make_clip(tenant.media / "in.mp4")
    set_limits(engine, tenant.name, slots=1)
    body = {"kind": "transcode", "input": "in.mp4", "output": "o.mp4", "preset": "h264-360p"}
    first = client.post("/v1/jobs", json=body, headers=tenant.headers).json
    assert first["slots"] == 2 and first["waiting"] == "workers_busy"
    client.application.extensions["ffworker"].ledger.claim_next("w")
    second = client.post("/v1/jobs", json={**body, "output": "p.mp4"}, headers=tenant.headers).json
    assert second["waiting"] == "tenant_limit"
    listed = client.get("/v1/jobs", headers=tenant.headers).json["jobs"]
    assert {job["id"]: job["waiting"] for job in listed} == {first["id"]: None, second["id"]: "tenant_limit"}
    assert client.get(f"/v1/jobs/{second['id']}", headers=tenant.headers).json["waiting"] == "tenant_limit"


def test_batch_submits_all_in_request_order(client, engine, ledger, tenant, make_clip, purge_queue):
    make_clip(tenant.media / "in.mp4")
    bodies = [{"kind": "probe", "input": "in.mp4", "metadata": {"n": n}} for n in range(50)]
    bodies[7] = {"kind": "thumbnail", "input": "in.mp4", "output": "t.jpg", "at_s": 0.5, "priority": 5}
    response = client.post("/v1/jobs/batch", json={"jobs": bodies}, headers=tenant.headers)
    assert response.status_code == 202
    jobs = response.json["jobs"]
    assert [job["metadata"] for job in jobs] == [body.get("metadata", {}) for body in bodies]
    assert jobs[7]["kind"] == "thumbnail" and jobs[7]["priority"] == 5
    assert all(job["status"] == "queued" and job["waiting"] == "workers_busy" for job in jobs)
    rows = {row["id"]: row for row in ledger.list(tenant.id, limit=100)}
    assert len(rows) == 50 and all(row["dispatch_count"] == 1 for row in rows.values())
    assert {e["reason"] for job in jobs for e in ledger.events(job["id"])} == {"submitted"}


def test_batch_is_all_or_nothing_and_names_index_and_field(client, ledger, tenant, make_clip):
    make_clip(tenant.media / "in.mp4")
    bodies = [{"kind": "probe", "input": "in.mp4"}] * 5
    bodies = [*bodies[:2], {"kind": "probe"}, bodies[3], {"kind": "probe", "input": "../etc/passwd"}]
    response = client.post("/v1/jobs/batch", json={"jobs": bodies}, headers=tenant.headers)
    assert response.status_code == 422
    errors = response.json["errors"]["jobs"]
    assert set(errors) == {"2", "4"} and "input" in errors["2"] and "input" in errors["4"]
    assert ledger.list(tenant.id, limit=10) == []
    too_many = client.post("/v1/jobs/batch", json={"jobs": [{"kind": "probe", "input": "in.mp4"}] * 1001},
                           headers=tenant.headers)
    assert too_many.status_code == 422 and ledger.list(tenant.id, limit=10) == []
    assert client.post("/v1/jobs/batch", json=[1], headers=tenant.headers).status_code == 422


def test_batch_idempotency_key_covers_the_whole_batch(client, ledger, tenant, make_clip, purge_queue):
    make_clip(tenant.media / "in.mp4")
    headers = {**tenant.headers, "Idempotency-Key": "nightly-42"}
    payload = {"jobs": [{"kind": "probe", "input": "in.mp4"}] * 3}
    first = client.post("/v1/jobs/batch", json=payload, headers=headers)
    replay = client.post("/v1/jobs/batch", json=payload, headers=headers)
    assert first.status_code == replay.status_code == 202
    assert [j["id"] for j in first.json["jobs"]] == [j["id"] for j in replay.json["jobs"]]
    assert len(ledger.list(tenant.id, limit=10)) == 3
    other = client.post("/v1/jobs/batch", json={"jobs": payload["jobs"][:2]}, headers=headers)
    assert other.status_code == 409 and len(ledger.list(tenant.id, limit=10)) == 3


def test_batch_inserts_in_one_statement(client, engine, tenant, make_clip, purge_queue):
    from sqlalchemy import event

    make_clip(tenant.media / "in.mp4")
    inserts = []

    def count(conn, cursor, statement, *args):
        if statement.lstrip().upper().startswith(("INSERT", "WITH")) and "INSERT INTO jobs" in statement:
            inserts.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        response = client.post("/v1/jobs/batch", json={"jobs": [{"kind": "probe", "input": "in.mp4"}] * 200},
                               headers=tenant.headers)
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert response.status_code == 202 and len(inserts) == 1


def test_tenants_set_limits_and_list(engine, tenant):
    from click.testing import CliRunner

    from ffworker.cli import cli

    runner = CliRunner()
    result = runner.invoke(cli, ["tenants", "set-limits", tenant.name, "--slots", "8", "--rate", "120/min"])
    assert result.exit_code == 0, result.output
    assert "slots 8, rate 120/min" in result.output
    listing = runner.invoke(cli, ["tenants", "list"]).output
    assert "8" in listing and "120/min" in listing
    assert runner.invoke(cli, ["tenants", "set-limits", tenant.name, "--slots", "0"]).exit_code != 0
    assert runner.invoke(cli, ["tenants", "set-limits", tenant.name, "--rate", "fast"]).exit_code != 0
    assert runner.invoke(cli, ["tenants", "set-limits", "nobody", "--slots", "2"]).exit_code != 0
    reset = runner.invoke(cli, ["tenants", "set-limits", tenant.name, "--slots", "default", "--rate", "none"])
    assert "slots 5 (default), rate none" in reset.output


def test_metrics_show_why_jobs_wait_and_each_tenants_running_slots(client, engine, ledger, tenant, other_tenant):
    set_limits(engine, tenant.name, slots=2)
    ledger.claim(new_job(ledger, tenant, kind="transcode", slots=2)["id"], "w")
    new_job(ledger, tenant)
    new_job(ledger, other_tenant)
    later = new_job(ledger, other_tenant)
    with engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET run_after = now() + interval '1 minute' WHERE id = :id"), {"id": later["id"]})
    body = client.get("/metrics").get_data(as_text=True)
    assert 'ffworker_jobs_waiting{reason="tenant_limit"} 1.0' in body
    assert 'ffworker_jobs_waiting{reason="workers_busy"} 1.0' in body
    assert 'ffworker_jobs_waiting{reason="backoff"} 1.0' in body
    assert 'ffworker_jobs_waiting{reason="global_limit"} 0.0' in body
    assert 'ffworker_tenant_running_slots{tenant="acme"} 2.0' in body
    assert 'ffworker_tenant_max_slots{tenant="globex"} 5.0' in body


def test_a_claim_gets_its_job_once_the_publish_stamp_lets_go_of_the_row(engine, ledger, tenant):
    """The API stamps a job's publish right after sending its message: a worker that takes
    the message at once finds the row held for a moment, and must claim it once it is free,
    not give up (that would drop the only message of that job)."""
    first_try_failed = threading.Event()

    class Watched(Ledger):
        def why_waiting(self, job_ids):  # asked only after a claim found nothing
            first_try_failed.set()
            return super().why_waiting(job_ids)

    watched = Watched(engine)
    job = new_job(ledger, tenant)
    claimed, errors = {}, []

    def claim():
        try:
            claimed["job"] = watched.claim_next("w", hint=job["id"]).job
        except NotClaimable as exc:
            errors.append(exc)

    with engine.connect() as holder:
        stamp = holder.begin()
        holder.execute(text("UPDATE jobs SET dispatched_at = now(), dispatch_count = dispatch_count + 1 "
                            "WHERE id = :id"), {"id": job["id"]})
        claimer = threading.Thread(target=claim)
        claimer.start()
        first_try_failed.wait(timeout=5)
        stamp.commit()
    claimer.join(timeout=10)
    assert not errors and claimed["job"]["id"] == job["id"]
