"""Live job status and progress for web clients: the SSE stream and the long-poll.

A stream subscribes to its job on the process's ``NotificationHub``
(``ffworker.listener``), sends what the client has not seen yet (resuming after
``Last-Event-ID``), and sleeps until the next notification, a keep-alive or its
maximum duration. Each stream or long-poll holds one of the process's stream
slots (``ffworker.stream_slots``) until it ends.
"""
from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Callable, Iterator, Mapping

from ffworker.config import Settings
from ffworker.listener import NotificationHub, Subscription
from ffworker.models import TERMINAL_STATUSES
from ffworker.stream_slots import Slots, StreamLimits

log = logging.getLogger("ffworker.sse")

RETRY_MS = 2000              # the SSE `retry:` hint for reconnecting clients
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)


# -- event ids ------------------------------------------------------------------


@dataclass(frozen=True)
class Cursor:
    """How far a client got: the last audit event (job_events.id) and the last
    progress write (progress_at, in microseconds since the epoch) it was sent.

    Every SSE ``id:`` is the cursor after that event, ``"<event id>-<progress µs>"``;
    a reconnect sends it back in ``Last-Event-ID`` and gets only what is newer.
    """

    event_id: int = 0
    progress_us: int = 0

    _FORMAT = re.compile(r"^(\d{1,19})-(\d{1,19})$")

    @classmethod
    def parse(cls, value: str | None) -> "Cursor | None":
        match = cls._FORMAT.match((value or "").strip())
        return cls(int(match.group(1)), int(match.group(2))) if match else None

    def __str__(self) -> str:
        return f"{self.event_id}-{self.progress_us}"


def micros(at: datetime) -> int:
    return (at - _EPOCH) // _MICROSECOND


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


PROGRESS_KEYS = ("percent", "frame", "fps", "speed", "out_time_s", "eta_s")


@dataclass(frozen=True)
class Item:
    event: str          # "status" or "progress"
    cursor: Cursor
    data: dict


def pending_items(job: Mapping, events: list[Mapping], cursor: Cursor,
                  present: Callable[[Mapping], dict]) -> list[Item]:
    """What a client at ``cursor`` has not been sent yet, oldest first.

    Status events are the job's audit rows after ``cursor.event_id``; the
    progress event is the job's current progress snapshot, if written after
    ``cursor.progress_us``, placed among them by time. The terminal status
    event also carries the whole job (as ``GET /v1/jobs/{id}`` shows it).
    """
    job_id = str(job["id"])
    progress_at = job.get("progress_at")
    progress_us = micros(progress_at) if progress_at is not None else None
    send_progress = progress_us is not None and progress_us > cursor.progress_us
    items: list[Item] = []
    event_id, sent_progress_us = cursor.event_id, cursor.progress_us
    attempt = 0
    for event in events:
        if send_progress and event["at"] > progress_at:
            sent_progress_us = progress_us
            items.append(Item("progress", Cursor(event_id, sent_progress_us), _progress(job, job_id, attempt)))
            send_progress = False
        if event["to_status"] == "running":
            attempt = event["attempt"]
        if event["id"] <= cursor.event_id:
            continue
        event_id = event["id"]
        data = {
            "job_id": job_id, "status": event["to_status"], "previous_status": event["from_status"],
            "attempt": event["attempt"], "at": _iso(event["at"]), "reason": event["reason"],
        }
        if event["to_status"] in TERMINAL_STATUSES and event["to_status"] == job["status"]:
            data["job"] = json.loads(json.dumps(present(job), default=_json_default))
        items.append(Item("status", Cursor(event_id, sent_progress_us), data))
    if send_progress:
        items.append(Item("progress", Cursor(event_id, progress_us), _progress(job, job_id, attempt)))
    return items


def _progress(job: Mapping, job_id: str, attempt: int) -> dict:
    return {"job_id": job_id, "attempt": attempt, "at": _iso(job["progress_at"]),
            **{key: job[f"progress_{key}"] for key in PROGRESS_KEYS}}


def _json_default(value):
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def format_event(item: Item) -> bytes:
    data = json.dumps(item.data, separators=(",", ":"), default=_json_default)
    return f"id: {item.cursor}\nevent: {item.event}\ndata: {data}\n\n".encode()


KEEPALIVE = b": keep-alive\n\n"


def is_finished(job: Mapping | None, events: list[Mapping]) -> bool:
    """The job ended and its terminal transition is among ``events``."""
    return job is None or (job["status"] in TERMINAL_STATUSES and bool(events)
                           and events[-1]["to_status"] == job["status"])


# -- the stream -----------------------------------------------------------------


class EventStream:
    """The body of one ``GET /v1/jobs/{id}/events`` response.

    An iterable with ``close()``: the WSGI server calls it when the client goes
    away (a write fails: at the latest at the next keep-alive) or the stream
    ends, and it frees the subscription and the slot even if iteration never
    started.
    """

    def __init__(self, hub: NotificationHub, slots: Slots, subscription: Subscription, snapshot,
                 cursor: Cursor | None, limits: StreamLimits, present: Callable[[Mapping], dict]) -> None:
        self.hub = hub
        self.slots = slots
        self.subscription = subscription
        self.first_snapshot = snapshot
        self.resumed = cursor is not None
        self.cursor = cursor or Cursor()
        self.limits = limits
        self.present = present
        self._closed = False
        self._lock = threading.Lock()

    @property
    def job(self) -> Mapping | None:
        return self.first_snapshot[0]

    @property
    def exhausted(self) -> bool:
        """A resumed client already has everything, the terminal status included."""
        job, events = self.first_snapshot
        return (self.resumed and job is not None and is_finished(job, events)
                and not pending_items(job, events, self.cursor, self.present))

    def __iter__(self) -> Iterator[bytes]:
        return self._generate()

    def _generate(self) -> Iterator[bytes]:
        started = last_write = time.monotonic()
        yield f"retry: {RETRY_MS}\n\n".encode()
        snapshot = self.first_snapshot
        while not self._closed:
            job, events = snapshot
            if job is None:  # pruned meanwhile
                return
            for item in pending_items(job, events, self.cursor, self.present):
                self.cursor = item.cursor
                yield format_event(item)
                last_write = time.monotonic()
            if is_finished(job, events) or self.hub.draining:
                return
            now = time.monotonic()
            remaining = started + self.limits.max_duration_s - now
            if remaining <= 0:
                return
            woke = self.subscription.wait(min(self.limits.keepalive_s - (now - last_write), remaining))
            if not woke and time.monotonic() - last_write >= self.limits.keepalive_s:
                yield KEEPALIVE
                last_write = time.monotonic()
            self.subscription.clear()  # before reading: a later notification wakes us again
            try:
                snapshot = self.hub.snapshot(self.subscription.job_id)  # cached unless something changed
            except Exception as exc:  # the ledger is away: end here, the client resumes with Last-Event-ID
                log.warning("job=%s event=stream_read_failed error=%s", self.subscription.job_id, type(exc).__name__)
                return

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.subscription.close()
        self.slots.release()


def open_stream(state: "Events", job_id, last_event_id: str | None,
                present: Callable[[Mapping], dict]) -> EventStream:
    """Subscribe first, then read: a change committed in between still wakes the stream.

    The caller holds one of ``state.slots``; the stream gives it back on close.
    """
    subscription = state.hub.subscribe(job_id)
    try:
        snapshot = state.hub.snapshot(job_id)
    except BaseException:
        subscription.close()
        raise
    return EventStream(state.hub, state.slots, subscription, snapshot, Cursor.parse(last_event_id),
                       state.limits, present)


def wait_for_end(hub: NotificationHub, job_id, timeout_s: float) -> Mapping | None:
    """Long-poll: the job once it is terminal, or as it is after ``timeout_s``."""
    subscription = hub.subscribe(job_id)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            subscription.clear()
            job, _ = hub.snapshot(job_id)
            remaining = deadline - time.monotonic()
            if job is None or job["status"] in TERMINAL_STATUSES or remaining <= 0 or hub.draining:
                return job
            subscription.wait(remaining)
    finally:
        subscription.close()


class Events:
    """Per-app (so per-process) state: the hub, the limits, the slots.

    The limits are settled on first use: gunicorn tells the process its thread
    count only after the app was created (``gunicorn_conf.post_worker_init``).
    """

    def __init__(self, hub: NotificationHub, settings: Settings, limits: StreamLimits | None = None) -> None:
        self.hub = hub
        self.settings = settings
        self._limits = limits
        self._slots: Slots | None = None
        self._lock = threading.Lock()

    @property
    def limits(self) -> StreamLimits:
        self._settle()
        return self._limits

    @property
    def slots(self) -> Slots:
        self._settle()
        return self._slots

    def _settle(self) -> None:
        if self._slots is None:
            with self._lock:
                if self._limits is None:
                    self._limits = StreamLimits.from_settings(self.settings)
                if self._slots is None:
                    self._slots = Slots(self._limits.max_streams)
