"""Sending one webhook delivery: the Celery task of the ``<task_queue>.webhooks`` queue.

A message carries the delivery id only; the row decides everything. An attempt:

1. **claims** the delivery (one statement): due (pending and ``next_attempt_at`` passed, or a
   retry was requested), and no other attempt's lease running; it takes a lease of
   ``LEASE_S``, counts the attempt (the fencing token) and logs its start. A duplicate
   message finds the lease taken or the delivery not due and does nothing;
2. **signs** the body afresh (``webhook-timestamp`` = the claim's database time) with every
   secret of the tenant that signs now, and POSTs it through the SSRF guard: 10 s in all,
   no redirects, no proxies;
3. **records** the outcome in one transaction, fenced by the token: any 2xx → delivered;
   else the next scheduled attempt (``SCHEDULE_S``, ±10 % jitter, from the database
   clock), or ``failed`` after the last one. A sender that dies mid-attempt leaves its lease
   to expire; the relay then publishes the delivery again and the next attempt goes out
   with the same ``webhook-id``.

A retry requested through the API is one more attempt outside the schedule: its failure
leaves the schedule (or the ``failed`` status) as it was.
"""
from __future__ import annotations

import http.client
import json
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Mapping

from celery import shared_task
from sqlalchemy import DateTime, Engine, text

from ffworker import s3, urlguard, webhooks
from ffworker.extensions import services
from ffworker.models import Job
from ffworker.schemas import JobSchema, present

log = logging.getLogger("ffworker.delivery")

DELIVER_TASK = "ffworker.webhooks.deliver"
# Delay before each scheduled attempt: at once, then 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h.
SCHEDULE_S = (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
MAX_ATTEMPTS = len(SCHEDULE_S)
JITTER = 0.10
TIMEOUT_S = 10.0
# An attempt holds its delivery this long: longer than the timeout plus recording it.
LEASE_S = 30.0
RESPONSE_EXCERPT_BYTES = 1024
# An endpoint whose attempts have failed for this long without one success is disabled.
DISABLE_AFTER_FAILING_S = 5 * 86400
USER_AGENT = "ffworker-webhooks/1"


def webhooks_queue(settings) -> str:
    return f"{settings.task_queue}.webhooks"


@shared_task(name=DELIVER_TASK, ignore_result=True)
def deliver(delivery_id: str) -> str | None:
    current = services()
    return send(current.engine, delivery_id, allow_private=current.settings.allow_private_urls,
                settings=current.settings)


# The snapshot is the row as JSON: these columns come back as text and are parsed again.
_TIMESTAMP_COLUMNS = tuple(column.name for column in Job.__table__.c if isinstance(column.type, DateTime))
_JOB_SCHEMA = JobSchema()


def job_from_snapshot(snapshot: Mapping[str, Any]) -> dict:
    """The ledger row the trigger snapshotted, with its timestamps as datetimes again."""
    row = dict(snapshot)
    for key in _TIMESTAMP_COLUMNS:
        if isinstance(row.get(key), str):
            row[key] = datetime.fromisoformat(row[key])
    return row


def event_body(delivery: Mapping[str, Any], output_url: Callable[[str], str] | None = None) -> str:
    """``{"type", "timestamp", "data"}``: data is the job exactly as ``GET /v1/jobs/{id}`` showed it
    at the transition (the API's own presenter and schema, applied to the trigger's snapshot),
    with object storage its outputs' download URLs made for this attempt."""
    data = _JOB_SCHEMA.dump(present(job_from_snapshot(delivery["job_snapshot"]), output_url))
    body = {"type": delivery["event"], "timestamp": delivery["event_at"].isoformat(), "data": data}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class Outcome:
    ok: bool
    status_code: int | None
    latency_ms: float
    error_class: str | None
    excerpt: str | None

    @property
    def result(self) -> str:
        return "success" if self.ok else (self.error_class or "http_status")


_DUE = "((d.status = 'pending' AND d.next_attempt_at <= now()) OR d.retry_requested_at IS NOT NULL)"

_CLAIM = text(f"""
    WITH claimed AS (
        UPDATE webhook_deliveries d
           SET attempts = d.attempts + 1,
               lease_until = now() + make_interval(secs => :lease_s),
               current_scheduled = (d.status = 'pending' AND d.next_attempt_at <= now()),
               published_at = NULL, publish_count = 0
         WHERE d.id = :id AND {_DUE} AND (d.lease_until IS NULL OR d.lease_until < now())
        RETURNING d.*
    ), interrupted AS (
        UPDATE webhook_attempts a SET finished_at = now(), error_class = 'interrupted'
          FROM claimed WHERE a.delivery_id = claimed.id AND a.finished_at IS NULL
    ), attempt AS (
        INSERT INTO webhook_attempts (delivery_id, attempt, scheduled)
        SELECT id, attempts, current_scheduled FROM claimed
        RETURNING started_at
    )
    SELECT claimed.*, attempt.started_at, e.url AS endpoint_url, t.name AS tenant_name
      FROM claimed CROSS JOIN attempt LEFT JOIN webhook_endpoints e ON e.id = claimed.endpoint_id
      LEFT JOIN tenants t ON t.id = claimed.tenant_id
""")


def claim(engine: Engine, delivery_id) -> dict | None:
    """Take the delivery for one attempt, or None (not due, leased by another attempt, or gone)."""
    with engine.begin() as conn:
        row = conn.execute(_CLAIM, {"id": delivery_id, "lease_s": LEASE_S}).mappings().first()
        if row is None:
            return None
        claimed = dict(row)
        claimed["secrets"] = webhooks.signing_secrets(conn, claimed["tenant_id"])
    return claimed


def send(engine: Engine, delivery_id, *, allow_private: bool, timeout_s: float = TIMEOUT_S,
         settings=None) -> str | None:
    """One attempt of the delivery, if it is due; returns the attempt's result class or None."""
    claimed = claim(engine, delivery_id)
    if claimed is None:
        return None
    body = event_body(claimed, s3.output_urls(settings, claimed["tenant_name"]) if settings is not None else None)
    timestamp = int(claimed["started_at"].timestamp())
    headers = {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": claimed["webhook_id"],
        "webhook-timestamp": str(timestamp),
        "webhook-signature": webhooks.signature_header(claimed["secrets"], claimed["webhook_id"], timestamp, body),
    }
    url = claimed["url"] or claimed["endpoint_url"]
    outcome = post(url, body.encode(), headers, timeout_s=timeout_s, allow_private=allow_private)
    record(engine, claimed, outcome)
    log.info("delivery=%s webhook_id=%s attempt=%d event=attempted result=%s status=%s latency_ms=%.1f",
             claimed["id"], claimed["webhook_id"], claimed["attempts"], outcome.result, outcome.status_code,
             outcome.latency_ms)
    return outcome.result


def post(url: str, body: bytes, headers: dict, *, timeout_s: float, allow_private: bool) -> Outcome:
    """POST through the guard; never raises. The whole exchange is cut off after ``timeout_s``."""
    started = time.monotonic()
    connection = None
    watchdog = None
    try:
        connection, target = urlguard.open_connection(url, timeout_s, allow_private=allow_private)
        connection.connect()
        sock = connection.sock
        watchdog = threading.Timer(max(0.0, timeout_s - (time.monotonic() - started)), _cut, (sock,))
        watchdog.daemon = True
        watchdog.start()
        connection.request("POST", target, body=body, headers=headers)
        response = connection.getresponse()
        excerpt = response.read(RESPONSE_EXCERPT_BYTES)
        latency = (time.monotonic() - started) * 1000
        ok = 200 <= response.status < 300
        return Outcome(ok, response.status, latency, None if ok else "http_status", _text(excerpt))
    except Exception as exc:  # noqa: BLE001 - every failure is an attempt's outcome
        return Outcome(False, None, (time.monotonic() - started) * 1000, _error_class(exc, started, timeout_s), None)
    finally:
        if watchdog is not None:
            watchdog.cancel()
        if connection is not None:
            connection.close()


def _cut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _error_class(exc: Exception, started: float, timeout_s: float) -> str:
    if isinstance(exc, urlguard.BlockedURL):
        return "blocked_address"
    if isinstance(exc, (TimeoutError, socket.timeout)) or time.monotonic() - started >= timeout_s:
        return "timeout"
    if isinstance(exc, ssl.SSLError):
        return "tls_error"
    if isinstance(exc, ConnectionError) and "resolve" in str(exc):
        return "dns_error"
    if isinstance(exc, http.client.HTTPException):
        return "protocol_error"
    if isinstance(exc, OSError):
        return "connection_error"
    return "error"


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace").replace("\x00", "")


_RECORD_ATTEMPT = text("""
    UPDATE webhook_attempts SET finished_at = now(), status_code = :status_code, latency_ms = :latency_ms,
                                error_class = :error_class, response_excerpt = :excerpt
     WHERE delivery_id = :id AND attempt = :token
""")
_BEFORE = text("SELECT status FROM webhook_deliveries WHERE id = :id AND attempts = :token FOR UPDATE")
# The delay before scheduled attempt k+1 is SCHEDULE_S[k] (k scheduled attempts done).
_RECORD = text("""
    UPDATE webhook_deliveries d SET
        status = CASE WHEN :ok THEN 'delivered'
                      WHEN d.current_scheduled AND d.scheduled_attempts + 1 >= :max_attempts THEN 'failed'
                      ELSE d.status END,
        next_attempt_at = CASE
            WHEN :ok OR (d.current_scheduled AND d.scheduled_attempts + 1 >= :max_attempts) THEN NULL
            WHEN d.current_scheduled THEN now() + make_interval(
                secs => (CAST(:schedule AS double precision[]))[d.scheduled_attempts + 2]
                        * (1 - :jitter + 2 * :jitter * random()))
            ELSE d.next_attempt_at END,
        finished_at = CASE
            WHEN :ok OR (d.current_scheduled AND d.scheduled_attempts + 1 >= :max_attempts) THEN now()
            ELSE d.finished_at END,
        scheduled_attempts = d.scheduled_attempts + CASE WHEN d.current_scheduled THEN 1 ELSE 0 END,
        retry_requested_at = CASE WHEN d.retry_requested_at <= :started_at THEN NULL ELSE d.retry_requested_at END,
        lease_until = NULL, current_scheduled = false
     WHERE d.id = :id AND d.attempts = :token
    RETURNING d.status, d.tenant_id, d.endpoint_id, extract(epoch FROM now() - d.event_at) AS since_event_s
""")
_COUNT = text("""
    INSERT INTO webhook_totals AS t (tenant_id, counter, outcome, total, seconds_sum, seconds_buckets)
    VALUES (:tenant_id, :counter, :outcome, 1, coalesce(CAST(:seconds AS double precision), 0),
            ffworker_observation(CAST(:seconds AS double precision), ffworker_seconds_bounds()))
    ON CONFLICT (tenant_id, counter, outcome) DO UPDATE SET
        total = t.total + 1, seconds_sum = t.seconds_sum + excluded.seconds_sum,
        seconds_buckets = ffworker_add_counts(t.seconds_buckets, excluded.seconds_buckets)
""")
_ENDPOINT_SUCCEEDED = text("UPDATE webhook_endpoints SET failing_since = NULL "
                           "WHERE id = :id AND failing_since IS NOT NULL")
_ENDPOINT_FAILED = text("UPDATE webhook_endpoints SET failing_since = coalesce(failing_since, now()) WHERE id = :id")


def record(engine: Engine, claimed: dict, outcome: Outcome) -> str | None:
    """Write the attempt's outcome; returns the delivery's status, or None when fenced out
    (the lease expired and another attempt took the delivery: only the log row is written)."""
    params = {"id": claimed["id"], "token": claimed["attempts"]}
    with engine.begin() as conn:
        conn.execute(_RECORD_ATTEMPT, {**params, "status_code": outcome.status_code,
                                       "latency_ms": round(outcome.latency_ms, 3),
                                       "error_class": outcome.error_class, "excerpt": outcome.excerpt})
        before = conn.execute(_BEFORE, params).scalar()
        if before is None:
            return None
        row = conn.execute(_RECORD, {
            **params, "ok": outcome.ok, "max_attempts": MAX_ATTEMPTS, "schedule": list(map(float, SCHEDULE_S)),
            "jitter": JITTER, "started_at": claimed["started_at"],
        }).mappings().one()
        conn.execute(_COUNT, {"tenant_id": row["tenant_id"], "counter": "attempts", "outcome": outcome.result,
                              "seconds": None})
        if row["status"] != before:  # the delivery ended with this attempt
            seconds = float(row["since_event_s"]) if row["status"] == "delivered" else None
            conn.execute(_COUNT, {"tenant_id": row["tenant_id"], "counter": "deliveries", "outcome": row["status"],
                                  "seconds": seconds})
        if row["endpoint_id"] is not None:
            if outcome.ok:
                conn.execute(_ENDPOINT_SUCCEEDED, {"id": row["endpoint_id"]})
            else:
                conn.execute(_ENDPOINT_FAILED, {"id": row["endpoint_id"]})
                if webhooks.disable_failing_endpoint(conn, row["endpoint_id"], DISABLE_AFTER_FAILING_S):
                    log.warning("endpoint=%s event=endpoint_disabled reason=failing for %d days",
                                row["endpoint_id"], DISABLE_AFTER_FAILING_S // 86400)
    return row["status"]
