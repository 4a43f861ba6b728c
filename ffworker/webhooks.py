"""Webhooks: tenants' endpoints and signing secrets, the Standard Webhooks signature, the
delivery log, and the delivery metrics.

The delivery rows themselves are written by the ``job_events`` trigger of migration
0008 (the transactional outbox) and sent by ``ffworker.delivery``; the relay that
publishes them is the maintenance duty ``ffworker.maintenance.webhook_relay``. See
docs/webhooks.md.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from typing import Any, Iterable, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString
from sqlalchemy import Connection, Engine, text

from ffworker.models import WEBHOOK_EVENTS

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
ROTATION_OVERLAP_S = 24 * 3600
EVENT_OF_STATUS = {"running": "job.started", "completed": "job.completed", "failed": "job.failed",
                   "cancelled": "job.cancelled"}


class NotFound(LookupError):
    pass


class Conflict(Exception):
    pass


# -- secrets and signatures -------------------------------------------------------


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def _key(secret: str) -> bytes:
    raw = secret[len(SECRET_PREFIX):] if secret.startswith(SECRET_PREFIX) else secret
    return base64.b64decode(raw + "=" * (-len(raw) % 4))


def sign(secret: str, webhook_id: str, timestamp: int, body: str | bytes) -> str:
    """``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`` keyed by the secret's base64 part."""
    if isinstance(body, bytes):
        body = body.decode()
    digest = hmac.new(_key(secret), f"{webhook_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signature_header(signing_secrets: Iterable[str], webhook_id: str, timestamp: int, body: str | bytes) -> str:
    """One ``v1,`` signature per secret, space separated (two during a rotation's overlap)."""
    return " ".join(sign(secret, webhook_id, timestamp, body) for secret in signing_secrets)


_INSERT_SECRET = text("""
    INSERT INTO webhook_secrets (tenant_id, secret) VALUES (:tenant_id, :secret)
    ON CONFLICT (tenant_id) WHERE expires_at IS NULL DO NOTHING
""")
_CURRENT_SECRET = text("SELECT secret FROM webhook_secrets WHERE tenant_id = :tenant_id AND expires_at IS NULL")


def current_secret(engine: Engine, tenant_id) -> str:
    """The tenant's signing secret, created on first use (concurrent first uses agree)."""
    with engine.begin() as conn:
        secret = conn.execute(_CURRENT_SECRET, {"tenant_id": tenant_id}).scalar()
        if secret is None:
            conn.execute(_INSERT_SECRET, {"tenant_id": tenant_id, "secret": new_secret()})
            secret = conn.execute(_CURRENT_SECRET, {"tenant_id": tenant_id}).scalar_one()
    return secret


def rotate_secret(engine: Engine, tenant_id) -> dict:
    """A new current secret; the previous one keeps signing for ROTATION_OVERLAP_S."""
    with engine.begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('ffworker_webhook_secret:' || :t))"),
                     {"t": str(tenant_id)})
        previous = conn.execute(text("""
            UPDATE webhook_secrets SET expires_at = now() + make_interval(secs => :overlap)
             WHERE tenant_id = :tenant_id AND expires_at IS NULL RETURNING expires_at
        """), {"tenant_id": tenant_id, "overlap": ROTATION_OVERLAP_S}).scalar()
        secret = new_secret()
        conn.execute(_INSERT_SECRET, {"tenant_id": tenant_id, "secret": secret})
        conn.execute(text("DELETE FROM webhook_secrets WHERE tenant_id = :tenant_id AND expires_at < now()"),
                     {"tenant_id": tenant_id})
        _audit(conn, tenant_id, None, "secret_rotated",
               "the previous secret signs until " + previous.isoformat() if previous else "first secret")
    return {"secret": secret, "previous_expires_at": previous}


def signing_secrets(conn: Connection, tenant_id) -> list[str]:
    """The secrets that sign now: the current one first, then any still in a rotation's overlap."""
    return list(conn.execute(text("""
        SELECT secret FROM webhook_secrets
         WHERE tenant_id = :tenant_id AND (expires_at IS NULL OR expires_at > now())
         ORDER BY expires_at DESC NULLS FIRST, created_at DESC
    """), {"tenant_id": tenant_id}).scalars())


def tenant_id_by_name(engine: Engine, name: str):
    with engine.connect() as conn:
        tenant_id = conn.execute(text("SELECT id FROM tenants WHERE name = :name"), {"name": name}).scalar()
    if tenant_id is None:
        raise NotFound(f"no tenant named {name!r}")
    return tenant_id


# -- endpoints -------------------------------------------------------------------------

_ENDPOINT_COLUMNS = ("id, url, events, workspace, description, enabled, created_at, updated_at, failing_since, "
                     "disabled_reason")


def _audit(conn: Connection, tenant_id, endpoint_id, action: str, detail: str | None = None) -> None:
    conn.execute(text("INSERT INTO webhook_audit (tenant_id, endpoint_id, action, detail) "
                      "VALUES (:tenant_id, :endpoint_id, :action, :detail)"),
                 {"tenant_id": tenant_id, "endpoint_id": endpoint_id, "action": action, "detail": detail})


def _events(values: Iterable[str]) -> list[str]:
    chosen = set(values)
    return [event for event in WEBHOOK_EVENTS if event in chosen]


def create_endpoint(engine: Engine, tenant_id, *, url: str, events: list[str], workspace: str | None,
                    description: str) -> dict:
    with engine.begin() as conn:
        row = conn.execute(text(f"""
            INSERT INTO webhook_endpoints (tenant_id, url, events, workspace, description)
            VALUES (:tenant_id, :url, :events, :workspace, :description) RETURNING {_ENDPOINT_COLUMNS}
        """), {"tenant_id": tenant_id, "url": url, "events": _events(events), "workspace": workspace,
               "description": description}).mappings().one()
        _audit(conn, tenant_id, row["id"], "endpoint_created", url)
    return dict(row)


def list_endpoints(engine: Engine, tenant_id) -> list[dict]:
    with engine.connect() as conn:
        rows = conn.execute(text(f"SELECT {_ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE tenant_id = :tenant_id "
                                 "ORDER BY created_at, id"), {"tenant_id": tenant_id}).mappings().all()
    return [dict(row) for row in rows]


def get_endpoint(engine: Engine, tenant_id, endpoint_id) -> dict:
    with engine.connect() as conn:
        row = conn.execute(text(f"SELECT {_ENDPOINT_COLUMNS} FROM webhook_endpoints "
                                "WHERE id = :id AND tenant_id = :tenant_id"),
                           {"id": endpoint_id, "tenant_id": tenant_id}).mappings().first()
    if row is None:
        raise NotFound("endpoint not found")
    return dict(row)


def update_endpoint(engine: Engine, tenant_id, endpoint_id, changes: Mapping[str, Any]) -> dict:
    """Change url, events, workspace, description or enabled. Disabling an endpoint ends its
    pending deliveries as failed (retry them after enabling it again)."""
    allowed = {k: v for k, v in changes.items() if k in ("url", "events", "workspace", "description", "enabled")}
    if "events" in allowed:
        allowed["events"] = _events(allowed["events"])
    assignments = ", ".join(f"{column} = :{column}" for column in allowed)
    with engine.begin() as conn:
        before = conn.execute(text("SELECT enabled FROM webhook_endpoints WHERE id = :id AND tenant_id = :tenant_id "
                                   "FOR UPDATE"), {"id": endpoint_id, "tenant_id": tenant_id}).first()
        if before is None:
            raise NotFound("endpoint not found")
        extra = ""
        if allowed.get("enabled") is True:
            extra = ", failing_since = NULL, disabled_reason = NULL"
        elif allowed.get("enabled") is False and before.enabled:
            extra = ", disabled_reason = 'disabled by request'"
        row = conn.execute(text(f"""
            UPDATE webhook_endpoints SET {assignments + ', ' if assignments else ''}updated_at = now(){extra}
             WHERE id = :id RETURNING {_ENDPOINT_COLUMNS}
        """), {**allowed, "id": endpoint_id}).mappings().one()
        if before.enabled and not row["enabled"]:
            _fail_pending(conn, endpoint_id)
        _audit(conn, tenant_id, endpoint_id, "endpoint_updated",
               json.dumps({k: v for k, v in allowed.items()}, sort_keys=True))
    return dict(row)


def delete_endpoint(engine: Engine, tenant_id, endpoint_id) -> None:
    """Delete the endpoint; its deliveries (and their log) go with it."""
    with engine.begin() as conn:
        url = conn.execute(text("DELETE FROM webhook_endpoints WHERE id = :id AND tenant_id = :tenant_id "
                                "RETURNING url"), {"id": endpoint_id, "tenant_id": tenant_id}).scalar()
        if url is None:
            raise NotFound("endpoint not found")
        _audit(conn, tenant_id, endpoint_id, "endpoint_deleted", url)


def _fail_pending(conn: Connection, endpoint_id) -> int:
    return conn.execute(text("""
        UPDATE webhook_deliveries SET status = 'failed', next_attempt_at = NULL, finished_at = now()
         WHERE endpoint_id = :endpoint_id AND status = 'pending'
    """), {"endpoint_id": endpoint_id}).rowcount


def disable_failing_endpoint(conn: Connection, endpoint_id, failing_for_s: float) -> bool:
    """Disable the endpoint when it has failed for ``failing_for_s`` without a success; audited."""
    row = conn.execute(text("""
        UPDATE webhook_endpoints
           SET enabled = false, updated_at = now(),
               disabled_reason = 'failing since ' || to_char(failing_since AT TIME ZONE 'UTC',
                                                             'YYYY-MM-DD"T"HH24:MI:SS"Z"')
         WHERE id = :id AND enabled AND failing_since < now() - make_interval(secs => :failing_for_s)
        RETURNING tenant_id, disabled_reason
    """), {"id": endpoint_id, "failing_for_s": failing_for_s}).first()
    if row is None:
        return False
    _fail_pending(conn, endpoint_id)
    _audit(conn, row.tenant_id, endpoint_id, "endpoint_disabled", row.disabled_reason)
    return True


# -- the delivery log -----------------------------------------------------------------------

_DELIVERY_COLUMNS = """
    d.id, d.job_id, d.endpoint_id, coalesce(d.url, e.url) AS url, d.event, d.webhook_id, d.status,
    d.attempts AS attempt_count, d.next_attempt_at, d.retry_requested_at, d.event_at, d.created_at, d.finished_at
"""


def list_deliveries(engine: Engine, tenant_id, *, job_id=None, endpoint_id=None, status=None, limit: int = 50,
                    before: tuple | None = None) -> list[dict]:
    """A tenant's deliveries, newest first, each with its attempts; ``before``: (created_at, id) cursor."""
    where = ["d.tenant_id = :tenant_id"]
    params: dict[str, Any] = {"tenant_id": tenant_id, "limit": limit}
    for column, value in (("job_id", job_id), ("endpoint_id", endpoint_id), ("status", status)):
        if value is not None:
            where.append(f"d.{column} = :{column}")
            params[column] = value
    if before is not None:
        where.append("(d.created_at, d.id) < (:before_at, :before_id)")
        params.update(before_at=before[0], before_id=before[1])
    query = text(f"""
        SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries d LEFT JOIN webhook_endpoints e ON e.id = d.endpoint_id
         WHERE {' AND '.join(where)} ORDER BY d.created_at DESC, d.id DESC LIMIT :limit
    """)
    with engine.connect() as conn:
        rows = [dict(row) for row in conn.execute(query, params).mappings()]
        _attach_attempts(conn, rows)
    return rows


def get_delivery(engine: Engine, tenant_id, delivery_id) -> dict:
    with engine.connect() as conn:
        row = conn.execute(text(f"""
            SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries d LEFT JOIN webhook_endpoints e ON e.id = d.endpoint_id
             WHERE d.id = :id AND d.tenant_id = :tenant_id
        """), {"id": delivery_id, "tenant_id": tenant_id}).mappings().first()
        if row is None:
            raise NotFound("delivery not found")
        rows = [dict(row)]
        _attach_attempts(conn, rows)
    return rows[0]


def _attach_attempts(conn: Connection, rows: list[dict]) -> None:
    by_id = {row["id"]: row for row in rows}
    for row in rows:
        row["attempts"] = []
    if not rows:
        return
    attempts = conn.execute(text("""
        SELECT delivery_id, attempt, scheduled, started_at, finished_at, status_code, latency_ms, error_class,
               response_excerpt
          FROM webhook_attempts WHERE delivery_id = ANY(:ids) ORDER BY delivery_id, attempt
    """), {"ids": list(by_id)}).mappings()
    for attempt in attempts:
        by_id[attempt["delivery_id"]]["attempts"].append(dict(attempt))


def request_retry(engine: Engine, tenant_id, delivery_id) -> dict:
    """Mark the delivery for one more attempt now (same webhook-id). The caller publishes it."""
    with engine.begin() as conn:
        row = conn.execute(text("""
            SELECT d.id, d.endpoint_id, e.enabled FROM webhook_deliveries d
              LEFT JOIN webhook_endpoints e ON e.id = d.endpoint_id
             WHERE d.id = :id AND d.tenant_id = :tenant_id FOR UPDATE OF d
        """), {"id": delivery_id, "tenant_id": tenant_id}).first()
        if row is None:
            raise NotFound("delivery not found")
        if row.endpoint_id is not None and not row.enabled:
            raise Conflict("the endpoint is disabled: enable it first")
        conn.execute(text("""
            UPDATE webhook_deliveries SET retry_requested_at = now(), published_at = now(), publish_count = 1
             WHERE id = :id
        """), {"id": delivery_id})
    return get_delivery(engine, tenant_id, delivery_id)


# -- metrics (read by ffworker.metrics at scrape time) ------------------------------------------

_METRIC_TOTALS = text("""
    SELECT t.name AS tenant, x.counter, x.outcome, x.total, x.seconds_sum, x.seconds_buckets
      FROM webhook_totals x JOIN tenants t ON t.id = x.tenant_id
""")
_METRIC_PENDING = text("""
    SELECT count(*) AS pending,
           coalesce(max(extract(epoch FROM now() - next_attempt_at)) FILTER (WHERE next_attempt_at <= now()), 0)
               AS oldest_due_s,
           coalesce(extract(epoch FROM now() - min(created_at)), 0) AS oldest_pending_s
      FROM webhook_deliveries WHERE status = 'pending'
""")


def metrics_read(conn: Connection) -> dict:
    return {"totals": conn.execute(_METRIC_TOTALS).mappings().all(),
            "pending": conn.execute(_METRIC_PENDING).mappings().one()}


def metric_families(read: dict, seconds_bounds: list[float]) -> Iterable[Metric]:
    deliveries = CounterMetricFamily("ffworker_webhook_deliveries", "Webhook deliveries that ended, by outcome",
                                     labels=["tenant", "outcome"])
    attempts = CounterMetricFamily("ffworker_webhook_attempts", "Webhook delivery attempts, by result",
                                   labels=["tenant", "result"])
    latency = HistogramMetricFamily("ffworker_webhook_delivery_latency_seconds",
                                    "From the job's transition to the receiver's 2xx answer", labels=["tenant"])
    for row in sorted(read["totals"], key=lambda r: (r["tenant"], r["counter"], r["outcome"])):
        if row["counter"] == "attempts":
            attempts.add_metric([row["tenant"], row["outcome"]], row["total"])
            continue
        deliveries.add_metric([row["tenant"], row["outcome"]], row["total"])
        if row["outcome"] == "delivered":
            running, buckets = 0, []
            for bound, count in zip([*seconds_bounds, float("inf")], row["seconds_buckets"] or []):
                running += count or 0
                buckets.append((floatToGoString(bound), running))
            latency.add_metric([row["tenant"]], buckets, sum_value=row["seconds_sum"])
    pending = read["pending"]
    yield deliveries
    yield attempts
    yield latency
    yield GaugeMetricFamily("ffworker_webhook_deliveries_pending", "Webhook deliveries not yet delivered or failed",
                            value=pending["pending"])
    yield GaugeMetricFamily("ffworker_webhook_oldest_pending_seconds",
                            "Age of the oldest pending webhook delivery (since its transition was recorded)",
                            value=float(pending["oldest_pending_s"]))
    yield GaugeMetricFamily("ffworker_webhook_oldest_due_seconds",
                            "How long the most overdue pending delivery has been due for its next attempt",
                            value=float(pending["oldest_due_s"]))
