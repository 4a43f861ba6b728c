"""The webhook outbox relay: publishes the Celery message of each due delivery.

The delivery rows are committed by the transition itself (the ``job_events`` trigger);
this module only turns due rows into messages on ``<task_queue>.webhooks``. Two
relays share one statement (``publish_due``), and any number of them may run at once:
each due row is stamped ``published_at`` under ``FOR UPDATE SKIP LOCKED`` before its
message is sent, so one relay publishes it and the others skip it.

* **The listener** — a thread in every worker process that consumes the webhooks queue.
  It ``LISTEN``s on ``ffworker_webhooks`` (the trigger NOTIFYs at the transition's
  commit) and publishes at once; it also wakes when the next scheduled retry is due,
  and at least every ``LISTEN_POLL_S``. This is what makes a delivery leave within
  milliseconds of the transition without touching the code that makes transitions.
* **The beat duty** (task ``ffworker.maintenance.webhook_relay``, every
  ``FFWORKER_MAINTENANCE_INTERVAL_S``) — the safety net: publishes what is due when no
  listener runs, and publishes again a delivery whose message was lost (a broker flush, a
  publish that failed, a sender killed mid-attempt whose lease expired): its last publish
  is older than ``REPUBLISH_AFTER_S``, doubling with each publish up to an hour so that a
  long, legitimate backlog is not flooded with duplicates. A duplicate message is
  harmless: the sender's claim lets one attempt through.
"""
from __future__ import annotations

import logging
import threading

from celery import shared_task
from celery.signals import worker_ready, worker_shutting_down
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from ffworker.delivery import DELIVER_TASK, webhooks_queue
from ffworker.extensions import services

log = logging.getLogger("ffworker.webhook_relay")

TASK = "ffworker.maintenance.webhook_relay"
SCHEDULE_ENTRY = "webhook-relay"
CHANNEL = "ffworker_webhooks"
REPUBLISH_AFTER_S = 30.0
REPUBLISH_MAX_S = 3600.0
BATCH = 500
LISTEN_POLL_S = 10.0
LISTEN_RETRY_S = 2.0


def interval_s(settings) -> float:
    return settings.maintenance_interval_s


_PUBLISH = text("""
    WITH due AS (
        SELECT id FROM webhook_deliveries
         WHERE ((status = 'pending' AND next_attempt_at <= now()) OR retry_requested_at IS NOT NULL)
           AND (lease_until IS NULL OR lease_until < now())
           AND (published_at IS NULL OR published_at < now() - make_interval(
                    secs => least(:max_s, :after_s * power(2, greatest(publish_count - 1, 0)))))
         ORDER BY next_attempt_at NULLS FIRST
         LIMIT :limit
         FOR UPDATE SKIP LOCKED
    )
    UPDATE webhook_deliveries d SET published_at = now(), publish_count = d.publish_count + 1
      FROM due WHERE d.id = due.id
    RETURNING d.id
""")
# Unpublished pending deliveries: each is due at its next attempt, or when the lease of an
# attempt in flight expires (its sender was lost).
_NEXT_DUE = text("""
    SELECT extract(epoch FROM min(greatest(next_attempt_at, coalesce(lease_until, next_attempt_at))) - now())
      FROM webhook_deliveries
     WHERE status = 'pending' AND published_at IS NULL
""")


def publish_due(engine: Engine, celery, queue: str, *, limit: int = BATCH) -> int:
    """Publish a message for each due delivery not published recently; returns how many were sent.

    The rows are stamped before the messages go out: a publish that fails is retried by a
    later round once ``REPUBLISH_AFTER_S`` has passed.
    """
    with engine.begin() as conn:
        ids = list(conn.execute(_PUBLISH, {"limit": limit, "after_s": REPUBLISH_AFTER_S,
                                           "max_s": REPUBLISH_MAX_S}).scalars())
    sent = 0
    for delivery_id in ids:
        try:
            celery.send_task(DELIVER_TASK, args=[str(delivery_id)], queue=queue)
            sent += 1
        except Exception as exc:  # kombu raises several families when the broker is away
            log.warning("delivery=%s event=publish_failed error=%s", delivery_id, type(exc).__name__)
            break
    return sent


def next_due_in(engine: Engine) -> float | None:
    """Seconds until the next unpublished pending delivery is due (negative: overdue), or None."""
    with engine.connect() as conn:
        value = conn.execute(_NEXT_DUE).scalar()
    return None if value is None else float(value)


@shared_task(name=TASK, ignore_result=True)
def task() -> int:
    """Beat's duty: publish due deliveries, lost messages included."""
    from flask import current_app

    current = services()
    total = 0
    while True:
        sent = publish_due(current.engine, current_app.extensions["celery"], webhooks_queue(current.settings))
        total += sent
        if sent < BATCH:
            break
    if total:
        log.info("event=webhook_relay published=%d", total)
    return total


# -- the listener in worker processes -----------------------------------------------


class Listener(threading.Thread):
    """LISTEN for new deliveries and publish them; wake for scheduled retries too."""

    def __init__(self, engine: Engine, celery, queue: str, database_url: str) -> None:
        super().__init__(name="ffworker-webhook-relay", daemon=True)
        self.engine, self.celery, self.queue = engine, celery, queue
        self.dsn = make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
        self.stopping = threading.Event()

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> None:
        import psycopg

        while not self.stopping.is_set():
            try:
                with psycopg.connect(self.dsn, autocommit=True, application_name="ffworker-webhook-relay") as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    while not self.stopping.is_set():
                        self._round()
                        wait = next_due_in(self.engine)
                        wait = LISTEN_POLL_S if wait is None else max(0.01, min(LISTEN_POLL_S, wait))
                        for _ in conn.notifies(timeout=wait, stop_after=1):
                            pass
            except Exception as exc:  # the database went away: reconnect after a pause
                log.warning("event=webhook_listener_error error=%s", type(exc).__name__)
                self.stopping.wait(LISTEN_RETRY_S)

    def _round(self) -> None:
        while publish_due(self.engine, self.celery, self.queue) == BATCH:
            pass


_listener: Listener | None = None


@worker_ready.connect
def _start_listener(sender=None, **_) -> None:
    """Start the listener in a worker that consumes the webhooks queue."""
    global _listener
    if sender is None or _listener is not None:
        return
    flask_app = getattr(sender.app, "flask_app", None)  # set by celery_wiring.celery_init_app
    if flask_app is None:
        return
    current = flask_app.extensions["ffworker"]
    queue = webhooks_queue(current.settings)
    consumed = {q.name for q in getattr(sender.task_consumer, "queues", ())}
    if queue not in consumed:
        return
    _listener = Listener(current.engine, sender.app, queue, current.settings.database_url)
    _listener.start()
    log.info("event=webhook_listener_started queue=%s", queue)


@worker_shutting_down.connect
def _stop_listener(**_) -> None:
    if _listener is not None:
        _listener.stop()
