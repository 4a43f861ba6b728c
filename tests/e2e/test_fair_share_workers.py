"""Fair share with real worker processes: limits that hold whatever the number of workers
racing, fairness between tenants, priority, no idle slot while eligible work waits (also
with the broker flushed and with a worker killed), and duplicated, lost and early messages."""
from __future__ import annotations

import os
import signal
import socket
import threading
from collections import Counter

import pytest
from sqlalchemy import text

from ffworker.celery_wiring import maintenance_queue
from ffworker.dispatch import dispatch
from ffworker.tenants import set_limits
from tests.conftest import BeatProcess, WorkerProcess
from tests.helpers import stop_fleet, wait_until

pytestmark = pytest.mark.e2e

FAST_RECOVERY = {
    "FFWORKER_STALE_AFTER_S": "3",
    # A fleet silent but for a killed run arms the reaper once: this grace is then its extra wait.
    "FFWORKER_REAPER_GRACE_S": "8",
    "FFWORKER_MAINTENANCE_INTERVAL_S": "1",
    "FFWORKER_REDISPATCH_AFTER_S": "3",
}


@pytest.fixture
def fleet(app, settings, purge_queue):
    """Processes the test starts; each is stopped group-wide at teardown."""
    processes: list = []
    yield processes
    stop_fleet(processes, app, settings)


def start(fleet, settings, tmp_path, names, *, env=None, concurrency=2, queues=None):
    workers = [WorkerProcess(settings, tmp_path / f"worker-{name}.log", concurrency=concurrency, name=f"fair-{name}",
                             env=env, queues=queues, wait=False) for name in names]
    fleet.extend(workers)
    for worker in workers:
        worker.wait_ready()
    return workers


def batch(client, tenant, bodies) -> list[dict]:
    response = client.post("/v1/jobs/batch", json={"jobs": bodies}, headers=tenant.headers)
    assert response.status_code == 202, response.json
    return response.json["jobs"]


def db_now(engine):
    with engine.connect() as conn:
        return conn.execute(text("SELECT now()")).scalar_one()


def all_ended(engine) -> bool:
    with engine.connect() as conn:
        return not conn.execute(text("SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')")).scalar()


def transitions(engine) -> list:
    """Every transition, in the order the ledger committed them (claims take turns on the
    fleet row, so a claim's event id is later than that of every run end it could see)."""
    with engine.connect() as conn:
        return conn.execute(text(
            "SELECT e.id, e.job_id::text AS job_id, t.name AS tenant, j.slots, e.from_status, e.to_status, "
            "e.attempt, e.at FROM job_events e JOIN jobs j ON j.id = e.job_id JOIN tenants t ON t.id = j.tenant_id "
            "ORDER BY e.id")).all()


def replay_peaks(rows) -> tuple[dict, int]:
    """The most slots each tenant ran at once, and the most jobs the fleet did, replayed from the audit."""
    slots, peak_slots, running, peak_running = Counter(), Counter(), 0, 0
    for row in rows:
        if row.to_status == "running":
            slots[row.tenant] += row.slots
            running += 1
        elif row.from_status == "running":
            slots[row.tenant] -= row.slots
            running -= 1
        peak_slots[row.tenant] = max(peak_slots[row.tenant], slots[row.tenant])
        peak_running = max(peak_running, running)
    return dict(peak_slots), peak_running


def assert_runs_never_overlap(rows) -> None:
    """No job ran twice at once: each claim of a job follows the end of its previous run."""
    open_runs: dict = {}
    for row in rows:
        if row.to_status == "running":
            assert row.job_id not in open_runs, f"job {row.job_id} claimed while attempt {open_runs[row.job_id]} ran"
            open_runs[row.job_id] = row.attempt
        elif row.from_status == "running":
            open_runs.pop(row.job_id, None)


class Sampler:
    """Running slots per tenant and running jobs, read from the jobs table every 50 ms."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.peak_slots: Counter = Counter()
        self.peak_running = 0
        self.samples = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            with self.engine.connect() as conn:
                rows = conn.execute(text(
                    "SELECT t.name, sum(j.slots), count(*) FROM jobs j JOIN tenants t ON t.id = j.tenant_id "
                    "WHERE j.status = 'running' GROUP BY t.name")).all()
            for name, slots, _ in rows:
                self.peak_slots[name] = max(self.peak_slots[name], slots)
            self.peak_running = max(self.peak_running, sum(count for *_, count in rows))
            self.samples += 1

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


def test_limits_hold_with_four_workers_racing_and_duplicated_messages(
        app, settings, client, engine, make_tenant, make_clip, fleet, tmp_path):
    a, b = make_tenant("tenant-a"), make_tenant("tenant-b")
    set_limits(engine, "tenant-a", slots=3)
    set_limits(engine, "tenant-b", slots=2)
    for tenant in (a, b):
        make_clip(tenant.media / "in.mp4", seconds=1, size="160x120")
    start(fleet, settings, tmp_path, ["1", "2", "3", "4"], env={"FFWORKER_MAX_RUNNING": "4"})

    sampler = Sampler(engine)
    bodies = [({"kind": "probe", "input": "in.mp4"} if n % 2 else
               {"kind": "transcode", "input": "in.mp4", "output": f"out/{n}.mp4", "preset": "h264-360p"})
              for n in range(30)]
    jobs = batch(client, a, bodies) + batch(client, b, bodies)
    # Duplicates: a second message for every job, and "run next" messages nothing freed.
    with app.app_context():
        for job in jobs[::2]:
            dispatch(job["id"])
        for _ in range(20):
            dispatch(None)
    try:
        wait_until(lambda: all_ended(engine), 90, interval_s=0.2)
    finally:
        sampler.finish()

    rows = transitions(engine)
    peak_slots, peak_running = replay_peaks(rows)
    print(f"limits figures: samples={sampler.samples} sampled_peaks={dict(sampler.peak_slots)} "
          f"sampled_running={sampler.peak_running} replayed_peaks={peak_slots} replayed_running={peak_running}")
    assert sampler.samples > 20
    assert sampler.peak_slots["tenant-a"] <= 3 and sampler.peak_slots["tenant-b"] <= 2
    assert sampler.peak_running <= 4
    assert peak_slots["tenant-a"] <= 3 and peak_slots["tenant-b"] <= 2 and peak_running <= 4
    # The limits were reached, not merely respected by a fleet too slow to reach them.
    assert peak_running == 4 or max(peak_slots.values()) >= 2
    with engine.connect() as conn:
        statuses = Counter(conn.execute(text("SELECT status FROM jobs")).scalars())
    assert statuses == {"completed": 60}
    claims = Counter(row.job_id for row in rows if row.to_status == "running")
    assert set(claims.values()) == {1}  # nothing ran twice
    assert_runs_never_overlap(rows)


def test_a_newcomer_is_served_at_the_next_free_slot_and_priority_goes_first(
        app, settings, client, engine, ledger, make_tenant, make_clip, fleet, tmp_path):
    a, b = make_tenant("tenant-a"), make_tenant("tenant-b")
    for tenant in (a, b):
        make_clip(tenant.media / "in.mp4", seconds=1, size="160x120")
    start(fleet, settings, tmp_path, ["1"])

    a_jobs = batch(client, a, [{"kind": "probe", "input": "in.mp4"}] * 200)
    wait_until(lambda: ledger.get(a_jobs[5]["id"])["status"] != "queued", 30, interval_s=0.02)
    b_jobs = batch(client, b, [{"kind": "probe", "input": "in.mp4"}] * 5)
    b_submitted = db_now(engine)  # after the batch committed: a claim that began later saw it
    b_ids = {job["id"] for job in b_jobs}

    def b_done():
        return all(ledger.get(job_id)["status"] == "completed" for job_id in b_ids)

    wait_until(b_done, 30, interval_s=0.05)
    queued_a = ledger.limits(a.id)["queued_jobs"]
    urgent = client.post("/v1/jobs", json={"kind": "probe", "input": "in.mp4", "priority": 100},
                         headers=a.headers).json
    urgent_submitted = db_now(engine)
    wait_until(lambda: ledger.get(urgent["id"])["status"] == "completed", 30, interval_s=0.05)
    with app.app_context():  # the rest of A's backlog is not needed
        ledger.cancel_matching({"tenant_id": a.id})
    wait_until(lambda: all_ended(engine), 30, interval_s=0.1)

    rows = transitions(engine)
    claims = [row for row in rows if row.to_status == "running"]
    after_b = [row for row in claims if row.at > b_submitted]
    b_claims = [row for row in claims if row.job_id in b_ids]
    # B's first job took the first slot that freed after B's submission (or an earlier one).
    assert b_claims[0].at <= b_submitted or after_b[0].job_id in b_ids, (after_b[:3], b_claims[:1])
    # B's five finished before A's 200th started (it never did: its claim would come after).
    b_last_end = max(row.id for row in rows if row.job_id in b_ids and row.to_status == "completed")
    a_last = [row for row in claims if row.job_id == a_jobs[-1]["id"]]
    assert not a_last or a_last[0].id > b_last_end
    # The priority-100 job, behind A's backlog, started next.
    assert queued_a >= 100, f"only {queued_a} of A's jobs were still queued: the test proves little"
    after_urgent = [row for row in claims if row.at > urgent_submitted]
    urgent_claim = [row for row in claims if row.job_id == urgent["id"]][0]
    assert urgent_claim.at <= urgent_submitted or after_urgent[0].job_id == urgent["id"]


def test_no_idle_slot_when_a_run_ends_with_the_broker_flushed(
        app, settings, client, engine, ledger, tenant, make_clip, fleet, tmp_path):
    set_limits(engine, tenant.name, slots=1)
    make_clip(tenant.media / "in.mp4", seconds=2, size="320x240")
    worker, = start(fleet, settings, tmp_path, ["1"])
    # A transcode costs 2 slots, more than the tenant's 1: it runs alone, it does not wait for ever.
    first = client.post("/v1/jobs", json={"kind": "transcode", "input": "in.mp4", "output": "out.mp4",
                                          "preset": "h264-360p"}, headers=tenant.headers).json
    wait_until(lambda: ledger.get(first["id"])["status"] == "running", 30, interval_s=0.02)
    second = client.post("/v1/jobs", json={"kind": "probe", "input": "in.mp4"}, headers=tenant.headers).json
    assert second["waiting"] == "tenant_limit"

    # Its message was taken and found the tenant at its limit: nothing more is queued for it.
    skipped = f"job={second['id']} attempt=none event=skipped"
    wait_until(lambda: skipped in worker.log_path.read_text(), 10, interval_s=0.02)
    with app.extensions["celery"].connection_for_write() as conn:  # the broker flushed
        conn.default_channel.queue_purge(settings.task_queue)
    assert ledger.get(second["id"])["status"] == "queued"
    wait_until(lambda: ledger.get(second["id"])["status"] == "completed", 30, interval_s=0.05)
    rows = transitions(engine)
    first_end = [row.at for row in rows if row.job_id == first["id"] and row.to_status == "completed"][0]
    second_start = [row.at for row in rows if row.job_id == second["id"] and row.to_status == "running"][0]
    print(f"idle slot after a run ended: {(second_start - first_end).total_seconds():.3f} s")
    assert (second_start - first_end).total_seconds() < 1.0


def test_a_killed_worker_frees_its_slots_and_limits_still_hold(
        app, settings, client, engine, ledger, make_tenant, make_clip, fleet, tmp_path):
    a, b = make_tenant("tenant-a"), make_tenant("tenant-b")
    set_limits(engine, "tenant-a", slots=2)
    set_limits(engine, "tenant-b", slots=1)
    for tenant in (a, b):
        make_clip(tenant.media / "in.mp4", seconds=2, size="320x240")
    queues = [settings.task_queue, maintenance_queue(settings)]
    fleet.append(BeatProcess(tmp_path / "beat-schedule", tmp_path / "beat.log", env=FAST_RECOVERY, wait=False))
    workers = start(fleet, settings, tmp_path, ["1", "2"], env=FAST_RECOVERY, queues=queues)
    fleet[0].wait_ready()
    # The reaper ran just now and is not armed (set once the fleet is up: a slow start-up would
    # read as missed rounds and arm its grace period).
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO maintenance_state (name, last_run_at) VALUES ('reaper', now()) "
                          "ON CONFLICT (name) DO UPDATE SET last_run_at = now(), armed_at = NULL"))

    transcode = {"kind": "transcode", "input": "in.mp4", "preset": "h264-360p"}
    a_jobs = batch(client, a, [{**transcode, "output": f"out/{n}.mp4"} for n in range(5)])
    b_jobs = batch(client, b, [{"kind": "probe", "input": "in.mp4"}] * 4)
    host = socket.gethostname()

    def holder_of_a():
        with engine.connect() as conn:
            running = conn.execute(text(
                "SELECT worker FROM jobs WHERE status = 'running' AND tenant_id = :t"), {"t": a.id}).scalars().all()
        for worker in workers:
            pool = {int(pid) for pid in os.listdir("/proc") if pid.isdigit() and _parent(int(pid)) == worker.proc.pid}
            if any(name in running for name in (f"{host}:{pid}" for pid in pool)):
                return worker
        return None

    victim = wait_until(holder_of_a, 30, interval_s=0.02)
    os.killpg(victim.pgid, signal.SIGKILL)
    victim.proc.wait(timeout=10)
    wait_until(lambda: all_ended(engine), 90, interval_s=0.2)

    rows = transitions(engine)
    peak_slots, _ = replay_peaks(rows)
    assert peak_slots["tenant-a"] <= 2 and peak_slots["tenant-b"] <= 1
    reaped = [row for row in rows if row.from_status == "running" and row.to_status == "queued"]
    assert reaped, "the killed worker's job was not reaped"
    # The slot the reaped run held went to waiting work at once, not a round later.
    next_claim = [row for row in rows if row.id > reaped[0].id and row.to_status == "running"]
    print(f"idle slot after a reap: {(next_claim[0].at - reaped[0].at).total_seconds():.3f} s")
    assert (next_claim[0].at - reaped[0].at).total_seconds() < 1.0
    with engine.connect() as conn:
        statuses = Counter(conn.execute(text("SELECT status FROM jobs")).scalars())
    assert statuses == {"completed": len(a_jobs) + len(b_jobs)}
    completions = Counter(row.job_id for row in rows if row.to_status == "completed")
    assert set(completions.values()) == {1}
    assert_runs_never_overlap(rows)


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def test_lost_duplicated_and_early_messages_with_limits_in_force(
        app, settings, client, engine, ledger, tenant, make_clip, fleet, tmp_path):
    set_limits(engine, tenant.name, slots=2)
    make_clip(tenant.media / "in.mp4", seconds=1, size="160x120")
    jobs = batch(client, tenant, [{"kind": "probe", "input": "in.mp4"}] * 12)
    late = jobs[0]["id"]
    with engine.begin() as conn:  # one job due in 2 s by the database's clock
        conn.execute(text("UPDATE jobs SET run_after = now() + interval '2 seconds' WHERE id = :id"), {"id": late})
    with app.extensions["celery"].connection_for_write() as conn:  # every message lost
        conn.default_channel.queue_purge(settings.task_queue)
    with app.app_context():
        for _ in range(3):
            dispatch(None)          # three survivors
        dispatch(jobs[1]["id"])     # a duplicate of a job's message
        dispatch(late)              # early: its job is not due yet
    start(fleet, settings, tmp_path, ["1"], concurrency=3)
    wait_until(lambda: all_ended(engine), 30, interval_s=0.1)  # no beat: nothing re-dispatches

    rows = transitions(engine)
    peak_slots, _ = replay_peaks(rows)
    assert peak_slots[tenant.name] <= 2
    claims = Counter(row.job_id for row in rows if row.to_status == "running")
    assert len(claims) == 12 and set(claims.values()) == {1}
    late_start = [row.at for row in rows if row.job_id == late and row.to_status == "running"][0]
    with engine.connect() as conn:
        due = conn.execute(text("SELECT run_after FROM jobs WHERE id = :id"), {"id": late}).scalar_one()
    assert late_start >= due
