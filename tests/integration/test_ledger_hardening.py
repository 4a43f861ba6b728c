"""Ways the ledger could lose or repeat work, each closed on a real PostgreSQL: a cancel
met by a transient failure, a retry showing the previous attempt's progress, a lost
claim reply (through a TCP proxy that drops it), an early message, a frozen writer,
and the reaper's grace after an outage of the ledger itself.
Time passes by backdating timestamps, never by sleeping."""
from __future__ import annotations

import socket
import threading
import time

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

from ffworker import db as ffdb
from ffworker.errors import JobBusy, NotClaimable
from ffworker.ledger import CANCEL_LOCK_WAIT_MS, Ledger
from ffworker.maintenance import reaper
from ffworker.worker import JobRun, RunFailure, RunReport

from tests.helpers import wait_until
from tests.integration.test_ledger import backdate, new_job, transitions
from tests.integration.test_maintenance import GRACE, STALE, reaper_running  # noqa: F401

INTERVAL = 15.0


def reap(ledger, **kwargs):
    return reaper.reap(ledger, stale_after_s=STALE, grace_s=GRACE, interval_s=INTERVAL, **kwargs)


# -- 1. a cancel pending when the run ends otherwise ----------------------------------


@pytest.mark.parametrize("code, retryable", [("ffmpeg_killed", True), ("io_error", True), ("timeout", False)])
def test_a_cancel_requested_before_the_run_fails_ends_cancelled(ledger, tenant, code, retryable):
    job = new_job(ledger, tenant, max_attempts=3)
    claim = ledger.claim(job["id"], "w1")
    ledger.request_cancel(job["id"], tenant.id)
    row = ledger.fail(job["id"], claim.token, code=code, message="it broke", stderr_tail="last words",
                      retryable=retryable)
    assert (row["status"], row["error_code"], row["finished_at"] is not None) == ("cancelled", "cancelled", True)
    (event,) = [e for e in ledger.events(job["id"]) if e["from_status"] == "running"]
    assert (event["to_status"], event["actor"]) == ("cancelled", "worker")
    assert event["reason"] == f"cancel requested; the run ended with {code}: it broke"
    assert event["stderr_tail"] == "last words"


def test_a_run_failing_transiently_after_a_cancel_reports_cancelled_not_retry(settings, ledger, tenant):
    job = new_job(ledger, tenant, max_attempts=3)
    run = JobRun(ledger.claim(job["id"], "w1"), ledger, settings)
    ledger.request_cancel(job["id"], tenant.id)
    # What the run does when ffmpeg dies by a signal before its next heartbeat saw the cancel.
    outcome = run.failed(RunFailure("ffmpeg_killed", "ffmpeg was killed by signal 9", retryable=True))
    assert (outcome, run.final_row["status"]) == ("cancelled", "cancelled")
    assert RunReport(outcome, run.final_row).retry_in_s is None  # so no message is published again


def test_no_write_can_leave_a_queued_job_with_a_pending_cancel(engine, ledger, tenant):
    job = new_job(ledger, tenant)
    claim = ledger.claim(job["id"], "w1")
    ledger.request_cancel(job["id"], tenant.id)
    with pytest.raises(IntegrityError, match="queued_not_cancel_requested"), engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET status = 'queued' WHERE id = :id"), {"id": claim.job["id"]})


# -- 13. a retry starts clean ---------------------------------------------------------------


def test_a_retry_starts_without_the_previous_attempts_progress_and_keeps_its_stderr_on_the_audit_row(
        engine, ledger, tenant):
    job = new_job(ledger, tenant, max_attempts=3)
    first = ledger.claim(job["id"], "w1")
    ledger.heartbeat(job["id"], first.token, {"percent": 87.0, "frame": 870, "fps": 30.0, "speed": 1.5,
                                               "out_time_s": 29.0, "eta_s": 3.0})
    ledger.fail(job["id"], first.token, code="ffmpeg_killed", message="signal 9", stderr_tail="frame=870",
                retryable=True)
    backdate(engine, job["id"], run_after=1)
    second = ledger.claim(job["id"], "w2")
    shown = {column: second.job[column] for column in (
        "progress_at", "progress_percent", "progress_frame", "progress_fps", "progress_speed",
        "progress_out_time_s", "progress_eta_s", "stderr_tail")}
    assert shown == dict.fromkeys(shown)
    assert ledger.get(job["id"])["progress_percent"] is None
    (retry,) = [e for e in ledger.events(job["id"]) if (e["from_status"], e["to_status"]) == ("running", "queued")]
    assert (retry["attempt"], retry["stderr_tail"]) == (1, "frame=870")


# -- 11. an early message learns when the job is due -----------------------------------------


def test_not_claimable_says_why_with_the_databases_remaining_delay(engine, ledger, tenant):
    job = new_job(ledger, tenant)
    backdate(engine, job["id"], run_after=-30)  # due in 30 s
    with pytest.raises(NotClaimable) as early:
        ledger.claim(job["id"], "w1")
    assert early.value.reason == "not_due" and 28 < early.value.due_in_s <= 30

    backdate(engine, job["id"], run_after=0)
    ledger.claim(job["id"], "w1")
    with pytest.raises(NotClaimable) as duplicate:
        ledger.claim(job["id"], "w2")
    assert (duplicate.value.reason, duplicate.value.due_in_s) == ("not_queued", None)


# -- 8. a lost claim reply -------------------------------------------------------------------


class ReplyDroppingProxy:
    """A loopback TCP proxy to PostgreSQL. Once armed with a marker, it forwards the next
    client message containing the marker, waits until the server's reply is complete
    (ReadyForQuery: the statement has committed in autocommit) and then closes both sides
    without forwarding a byte of that reply. Armed with ``before_server=True`` it closes
    both sides instead of forwarding that message at all."""

    READY_FOR_QUERY = b"Z\x00\x00\x00\x05"

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.marker: bytes | None = None
        self.before_server = False
        self.dropped = threading.Event()
        self._lock = threading.Lock()
        self._closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, marker: bytes, *, before_server: bool = False) -> None:
        self.before_server = before_server
        self.marker = marker

    def close(self) -> None:
        self._closing = True
        self.listener.close()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            state = {"drop_reply": False}
            threading.Thread(target=self._to_server, args=(client, server, state), daemon=True).start()
            threading.Thread(target=self._to_client, args=(server, client, state), daemon=True).start()

    def _to_server(self, client, server, state) -> None:
        try:
            while data := client.recv(65536):
                with self._lock:
                    if self.marker is not None and self.marker in data:
                        self.marker = None
                        if self.before_server:
                            self.dropped.set()
                            break
                        state["drop_reply"] = True
                server.sendall(data)
        except OSError:
            pass
        finally:
            _shut(server)
            _shut(client)

    def _to_client(self, server, client, state) -> None:
        held = b""
        try:
            while data := server.recv(65536):
                if state["drop_reply"]:
                    held += data
                    if self.READY_FOR_QUERY in held:
                        self.dropped.set()
                        break
                    continue
                client.sendall(data)
        except OSError:
            pass
        finally:
            _shut(client)
            _shut(server)


def _shut(sock) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


@pytest.mark.parametrize("lost", ["reply after commit", "request before the server"])
def test_a_claim_whose_connection_drops_still_runs_and_burns_no_attempt(settings, engine, tenant, lost):
    proxy = ReplyDroppingProxy("127.0.0.1", make_url(settings.database_url).port or 5432)
    url = make_url(settings.database_url).set(host="127.0.0.1", port=proxy.port, query={"sslmode": "disable"})
    proxied = ffdb.get_engine(url.render_as_string(hide_password=False))
    try:
        ledger = Ledger(proxied)
        job = new_job(ledger, tenant, max_attempts=1)
        # The claim's guard, in its statement text.
        proxy.arm(b"run_after <= now()", before_server=lost == "request before the server")
        claim = ledger.claim(job["id"], "w1")
        assert proxy.dropped.is_set()  # the connection really was dropped
        assert (claim.token, claim.job["status"], claim.job["worker"]) == (1, "running", "w1")
        row = ledger.get(job["id"])
        assert (row["status"], row["attempts"], row["claim_id"]) == ("running", 1, claim.job["claim_id"])
        assert ledger.complete(job["id"], claim.token, {"outputs": []})["status"] == "completed"
        assert transitions(ledger, job["id"]) == [(None, "queued", 0), ("queued", "running", 1),
                                                  ("running", "completed", 1)]
    finally:
        proxied.dispose()
        proxy.close()


# -- 6. a frozen writer ----------------------------------------------------------------------


def test_every_session_of_the_engine_carries_the_documented_timeouts(settings):
    with ffdb.get_engine(settings.database_url).connect() as conn:
        shown = {name: conn.exec_driver_sql(f"SHOW {name}").scalar()
                 for name in ("idle_in_transaction_session_timeout", "lock_timeout", "statement_timeout")}
    assert shown == {
        "idle_in_transaction_session_timeout": f"{ffdb.IDLE_IN_TRANSACTION_TIMEOUT_S}s",
        "lock_timeout": f"{ffdb.LOCK_TIMEOUT_S}s",
        "statement_timeout": f"{ffdb.STATEMENT_TIMEOUT_S // 60}min",
    }


def test_a_frozen_writer_blocks_neither_cancel_nor_the_reaper(engine, ledger, client, tenant, reaper_running):  # noqa: F811
    job = new_job(ledger, tenant)
    claim = ledger.claim(job["id"], "w1")
    backdate(engine, job["id"], heartbeat_at=STALE + 1)
    frozen = engine.connect()  # an ffworker session stopped between its UPDATE and COMMIT
    frozen.begin()
    frozen.execute(text("UPDATE jobs SET updated_at = now() WHERE id = :id"), {"id": job["id"]})

    answered: list = []

    def cancel():
        started = time.monotonic()
        try:
            ledger.request_cancel(job["id"], tenant.id)
            answered.append(("cancelled", time.monotonic() - started))
        except JobBusy:
            answered.append(("busy", time.monotonic() - started))

    canceller = threading.Thread(target=cancel)
    canceller.start()
    canceller.join(timeout=5)
    try:
        assert not canceller.is_alive(), "cancel waited on the frozen writer"
        (outcome, took_s), = answered
        assert outcome == "busy" and took_s < CANCEL_LOCK_WAIT_MS / 1000 + 1.0
        response = client.post(f"/v1/jobs/{job['id']}/cancel", headers=tenant.headers)
        assert response.status_code == 503 and response.headers["Retry-After"] == "1"

        started = time.monotonic()
        report = reap(ledger)  # skips the locked row, does not wait for it
        assert time.monotonic() - started < 2.0
        assert report.status == "reaped" and report.decisions == []

        # The server ends the frozen session (shortened here from the engine's value, which the
        # test above checks) and its lock goes with it: cancel and reaper act on the next try.
        frozen.exec_driver_sql("SET idle_in_transaction_session_timeout = 300")
        wait_until(lambda: _cancel_went_through(ledger, job["id"], tenant.id), timeout_s=10)
        decisions = reap(ledger).decisions
        assert [(d["id"], d["status"]) for d in decisions] == [(claim.job["id"], "cancelled")]
    finally:
        frozen.invalidate()  # closes the session: the server rolls it back and the lock goes
        frozen.close()
        canceller.join(timeout=30)


def _cancel_went_through(ledger, job_id, tenant_id) -> bool:
    try:
        return ledger.request_cancel(job_id, tenant_id)["cancel_requested_at"] is not None
    except JobBusy:
        return False


# -- 3. the grace period after an outage of the ledger ------------------------------------------


def _after_an_outage(engine, job_ids, seconds: float) -> None:
    """Nothing reached the ledger for ``seconds``: neither heartbeats nor reaper rounds."""
    for job_id in job_ids:
        backdate(engine, job_id, heartbeat_at=seconds)
    with engine.begin() as conn:
        conn.execute(text("UPDATE maintenance_state SET last_run_at = now() - make_interval(secs => :s), "
                          "last_armed_at = now() - interval '1 day'"), {"s": seconds})


@pytest.mark.parametrize("outage_s", [STALE + INTERVAL / 2, (STALE + GRACE) / 2, GRACE * 3])
def test_an_outage_of_the_ledger_longer_than_the_stale_threshold_arms_the_reaper(
        engine, ledger, tenant, reaper_running, outage_s):  # noqa: F811
    live = ledger.claim(new_job(ledger, tenant)["id"], "w-live")
    dead = ledger.claim(new_job(ledger, tenant)["id"], "w-dead")
    _after_an_outage(engine, [live.job["id"], dead.job["id"]], outage_s)

    report = reap(ledger)
    assert report.status == "arming" and report.decisions == []
    assert reap(ledger).status == "armed"
    ledger.heartbeat(live.job["id"], live.token)  # the live worker is back within the grace

    with engine.begin() as conn:  # the grace has passed
        conn.execute(text("UPDATE maintenance_state SET armed_at = now() - interval '1 second'"))
    report = reap(ledger)
    assert report.status == "reaped"
    assert [d["id"] for d in report.decisions] == [dead.job["id"]]
    assert ledger.get(live.job["id"])["status"] == "running"


def test_a_fleet_silent_while_beat_kept_running_arms_once_then_reaps(engine, ledger, tenant, clean_ledger):
    with engine.begin() as conn:  # the reaper's rounds went on (beat and its connection were fine)
        conn.execute(text("INSERT INTO maintenance_state (name, last_run_at) VALUES ('reaper', now())"))
    dead = ledger.claim(new_job(ledger, tenant)["id"], "w-dead")
    backdate(engine, dead.job["id"], heartbeat_at=STALE + 1)

    assert reap(ledger).status == "arming"
    with engine.begin() as conn:
        conn.execute(text("UPDATE maintenance_state SET armed_at = now() - interval '1 second'"))
    # Still silent after the grace: a dead worker, not an outage. Reaped, not armed again.
    report = reap(ledger)
    assert report.status == "reaped" and [d["id"] for d in report.decisions] == [dead.job["id"]]


def test_a_silence_after_the_last_arming_arms_again(engine, ledger, tenant, reaper_running):  # noqa: F811
    job = ledger.claim(new_job(ledger, tenant)["id"], "w1")
    with engine.begin() as conn:  # armed long ago; the job heartbeated since, then went silent
        conn.execute(text("UPDATE maintenance_state SET last_armed_at = now() - interval '10 minutes'"))
    backdate(engine, job.job["id"], heartbeat_at=STALE + 1)
    assert reap(ledger).status == "arming"


def test_a_single_silent_job_beside_a_live_fleet_is_reaped_without_arming(engine, ledger, tenant, clean_ledger):
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO maintenance_state (name, last_run_at) VALUES ('reaper', now())"))
    live = ledger.claim(new_job(ledger, tenant)["id"], "w-live")
    dead = ledger.claim(new_job(ledger, tenant)["id"], "w-dead")
    backdate(engine, dead.job["id"], heartbeat_at=STALE + 1)
    report = reap(ledger)
    assert report.status == "reaped" and [d["id"] for d in report.decisions] == [dead.job["id"]]
    assert ledger.get(live.job["id"])["status"] == "running"
