"""A small Python client for the REST API (used by ``manage.py submit`` and ``jobs``)."""
from __future__ import annotations

import base64
import codecs
import hashlib
import hmac
import json
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import requests
import urllib3

TERMINAL = ("completed", "failed", "cancelled")
DEFAULT_URL = "http://127.0.0.1:8000"
PROGRESS_KEYS = ("percent", "frame", "fps", "speed", "out_time_s", "eta_s")
# The server sends a keep-alive comment at least every FFWORKER_SSE_KEEPALIVE_S
# (15 s by default): a read that waits much longer means the connection is gone.
STREAM_READ_TIMEOUT_S = 60.0
STREAM_RECONNECTS = 10       # consecutive failed or short-lived connections before giving up
STREAM_SHORT_S = 5.0
RETRY_AFTER_MAX_S = 30.0


WEBHOOK_TOLERANCE_S = 300


class WebhookVerificationError(Exception):
    """A webhook whose signature, or timestamp, does not check out: answer it 400 and drop it."""


def verify_webhook(headers, body: bytes | str, secret: str, *, tolerance_s: float = WEBHOOK_TOLERANCE_S,
                   now: float | None = None) -> dict:
    """Check a webhook from ffworker (Standard Webhooks) and return its parsed body.

    ``headers``: the request's headers (any mapping; names are matched case-insensitively),
    ``body``: the raw request body exactly as received, ``secret``: the tenant's ``whsec_…``
    secret. Raises ``WebhookVerificationError`` when no ``v1`` signature matches or the
    timestamp is more than ``tolerance_s`` away from now. De-duplicate on ``webhook-id``:
    a delivery may arrive more than once.
    """
    lowered = {str(k).lower(): v for k, v in dict(headers).items()}
    webhook_id = lowered.get("webhook-id")
    timestamp = lowered.get("webhook-timestamp")
    signatures = lowered.get("webhook-signature")
    if not (webhook_id and timestamp and signatures):
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        sent_at = int(timestamp)
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not an integer") from None
    if abs((time.time() if now is None else now) - sent_at) > tolerance_s:
        raise WebhookVerificationError("webhook-timestamp is too old or too far in the future")
    if isinstance(body, str):
        body = body.encode()
    raw = secret[len("whsec_"):] if secret.startswith("whsec_") else secret
    key = base64.b64decode(raw + "=" * (-len(raw) % 4))
    expected = hmac.new(key, f"{webhook_id}.{sent_at}.".encode() + body, hashlib.sha256).digest()
    for candidate in signatures.split():
        version, _, signature = candidate.partition(",")
        if version != "v1":
            continue
        try:
            if hmac.compare_digest(expected, base64.b64decode(signature)):
                return json.loads(body)
        except ValueError:
            continue
    raise WebhookVerificationError("no matching signature")


class ApiError(Exception):
    def __init__(self, status: int, body: dict) -> None:
        super().__init__(f"HTTP {status}: {body.get('message', body)}")
        self.status = status
        self.body = body


@dataclass(frozen=True)
class Event:
    """One Server-Sent Event of a job stream: ``event`` is "status" or "progress"."""

    id: str | None
    event: str
    data: dict


class Client:
    def __init__(self, base_url: str | None = None, api_key: str | None = None, timeout_s: float = 30.0) -> None:
        self.base_url = (base_url or os.environ.get("FFWORKER_API_URL") or DEFAULT_URL).rstrip("/")
        self.session = requests.Session()
        key = api_key or os.environ.get("FFWORKER_API_KEY")
        if key:
            self.session.headers["Authorization"] = f"Bearer {key}"
        self.timeout_s = timeout_s

    def _call(self, method: str, path: str, timeout_s: float | None = None, **kwargs) -> dict:
        response = self.session.request(method, self.base_url + path, timeout=timeout_s or self.timeout_s, **kwargs)
        return _body(response)

    def submit(self, request: dict, idempotency_key: str | None = None) -> dict:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._call("POST", "/v1/jobs", json=request, headers=headers)

    def get(self, job_id: str, wait_s: float | None = None) -> dict:
        """The job; with ``wait_s`` (≤ 60) the server answers once it ended, or after that long."""
        if wait_s is None:
            return self._call("GET", f"/v1/jobs/{job_id}")
        return self._call("GET", f"/v1/jobs/{job_id}", params={"wait": wait_s}, timeout_s=self.timeout_s + wait_s)

    def list(self, **filters) -> dict:
        return self._call("GET", "/v1/jobs", params={k: v for k, v in filters.items() if v is not None})

    def cancel(self, job_id: str) -> dict:
        return self._call("POST", f"/v1/jobs/{job_id}/cancel")

    def healthy(self) -> bool:
        try:
            return self.session.get(self.base_url + "/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    # -- live events -------------------------------------------------------

    def events(self, job_id: str, last_event_id: str | None = None) -> Iterator[Event]:
        """The job's status and progress events until its terminal status.

        Reconnects with ``Last-Event-ID`` when the connection drops or the
        server ends the stream early (a restart, its maximum stream duration),
        so no event is missed and none repeated; waits out a 503 (the server's
        stream slots are full) as its Retry-After says.
        """
        failures = 0
        while True:
            headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
            if last_event_id:
                headers["Last-Event-ID"] = last_event_id
            try:
                response = self.session.get(f"{self.base_url}/v1/jobs/{job_id}/events", headers=headers,
                                            stream=True, timeout=(self.timeout_s, STREAM_READ_TIMEOUT_S))
            except requests.RequestException:
                failures += 1
                if failures > STREAM_RECONNECTS:
                    raise
                time.sleep(min(RETRY_AFTER_MAX_S, 0.5 * 2 ** failures))
                continue
            with response:
                if response.status_code == 204:  # resumed after the terminal status
                    return
                if response.status_code == 503:
                    failures += 1
                    if failures > STREAM_RECONNECTS:
                        _body(response)
                    time.sleep(_retry_after(response))
                    continue
                if response.status_code >= 400:
                    _body(response)
                connected_at = time.monotonic()
                try:
                    for event in _parse_sse(response):
                        failures = 0
                        if event.id:
                            last_event_id = event.id
                        yield event
                        if event.event == "status" and event.data.get("status") in TERMINAL:
                            return
                except (requests.RequestException, urllib3.exceptions.HTTPError, OSError):
                    pass
                # The stream ended early: a dropped connection, a server restart, or its maximum
                # duration. Resume at once after a long stream; back off after short-lived ones.
                if time.monotonic() - connected_at < STREAM_SHORT_S:
                    failures += 1
                    if failures > STREAM_RECONNECTS:
                        raise ApiError(502, {"message": "the event stream keeps ending; giving up"})
                    time.sleep(min(RETRY_AFTER_MAX_S, 0.25 * 2 ** failures))

    def wait(self, job_id: str, on_update: Callable[[dict], None] | None = None) -> dict:
        """Follow the job's event stream until it ends; returns the final job.

        ``on_update`` gets {"id", "status", "progress"} after every event.
        """
        state: dict = {"id": job_id, "status": None, "progress": None}
        final = None
        for event in self.events(job_id):
            if event.event == "status":
                state["status"] = event.data["status"]
                final = event.data.get("job") or final
            elif event.event == "progress":
                state["progress"] = {key: event.data.get(key) for key in PROGRESS_KEYS}
            if on_update:
                on_update(dict(state))
        if final is None:  # the stream had already ended before we joined it
            final = self.get(job_id)
            if on_update:
                on_update(final)
        return final


def _body(response: requests.Response) -> dict:
    try:
        body = response.json()
    except ValueError:
        body = {"message": response.text[:200]}
    if response.status_code >= 400:
        raise ApiError(response.status_code, body)
    return body


def _retry_after(response: requests.Response) -> float:
    try:
        return max(0.5, min(RETRY_AFTER_MAX_S, float(response.headers.get("Retry-After", "5"))))
    except ValueError:
        return 5.0


def _parse_sse(response: requests.Response) -> Iterator[Event]:
    """Server-Sent Events as they arrive (``read1``: never waits for a full buffer)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    pending = ""
    skip_lf = False  # the previous chunk ended with CR: a LF starting this one belongs to it
    fields: dict = {}
    data: list[str] = []
    while True:
        chunk = response.raw.read1(65536)
        if not chunk:
            return
        text = decoder.decode(chunk)
        if skip_lf and text.startswith("\n"):
            text = text[1:]
        skip_lf = text.endswith("\r")
        lines = (pending + text).replace("\r\n", "\n").replace("\r", "\n").split("\n")
        pending = lines.pop()
        for line in lines:
            if line == "":
                if data:
                    payload = "\n".join(data)
                    try:
                        parsed = json.loads(payload)
                    except ValueError:
                        parsed = {"raw": payload}
                    yield Event(fields.get("id"), fields.get("event", "message"), parsed)
                fields, data = {}, []
            elif line.startswith(":"):
                continue  # a comment: the server's keep-alive
            else:
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "data":
                    data.append(value)
                elif name in ("id", "event"):
                    fields[name] = value
