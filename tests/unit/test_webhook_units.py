"""Webhook pieces that need no services: signatures, the schedule, the wiring."""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from standardwebhooks import Webhook

from ffworker import delivery, webhooks
from ffworker.celery_wiring import beat_schedule, task_routes
from ffworker.client import verify_webhook
from ffworker.config import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_signatures_match_the_standardwebhooks_reference():
    secret = webhooks.new_secret()
    assert secret.startswith("whsec_")
    body = '{"type":"job.completed","data":{"id":"x"}}'
    ours = webhooks.sign(secret, "msg_1", 1700000000, body)
    theirs = Webhook(secret).sign("msg_1", datetime.fromtimestamp(1700000000, tz=timezone.utc), body)
    assert ours == theirs
    header = webhooks.signature_header([webhooks.new_secret(), secret], "msg_1", 1700000000, body)
    assert len(header.split()) == 2
    headers = {"Webhook-Id": "msg_1", "Webhook-Timestamp": "1700000000", "Webhook-Signature": header}
    assert verify_webhook(headers, body, secret, now=1700000001)["data"] == {"id": "x"}


def test_the_schedule_is_eight_attempts_over_about_a_day():
    assert delivery.SCHEDULE_S == (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
    assert delivery.MAX_ATTEMPTS == 8 and delivery.TIMEOUT_S == 10 and delivery.JITTER == 0.1
    assert delivery.LEASE_S > delivery.TIMEOUT_S


def test_wiring_queue_schedule_and_setting():
    settings = Settings(task_queue="q", maintenance_interval_s=7)
    assert delivery.webhooks_queue(settings) == "q.webhooks"
    entry = beat_schedule(settings)["webhook-relay"]
    assert entry["task"] == "ffworker.maintenance.webhook_relay" and entry["schedule"] == 7
    routes = task_routes(settings)
    assert routes[delivery.DELIVER_TASK] == {"queue": "q.webhooks"}
    assert routes["ffworker.maintenance.webhook_relay"] == {"queue": "q.maintenance"}
    for name in ("Procfile", "Makefile"):
        assert "FFWORKER_TASK_QUEUE:-ffworker}.webhooks" in (ROOT / name).read_text()
    assert Settings.from_env({"FFWORKER_ALLOW_PRIVATE_URLS": "1"}).allow_private_urls is True
    assert Settings.from_env({}).allow_private_urls is False
