"""Live job events for web clients: the SSE stream and the long-poll.

Every ledger transition and progress write runs ``pg_notify('ffworker_jobs',
'<job id>:status|progress')`` inside its transaction, so PostgreSQL delivers it
exactly when the change is committed; a submission does not (nobody can follow a
job before its id is returned). Each web process holds ONE listening
connection (``NotificationHub``), whatever the number of clients; a
notification wakes only the clients that follow that job, and they read the
job once per notification per process (a small snapshot cache), never on a
timer. Without the listening connection (the database restarting, say), streams
fall back to reading every ``DEGRADED_POLL_S`` until it is back, and the hub
wakes every stream when it reconnects so nothing committed meanwhile is missed.

An open stream or long-poll holds a server thread for its whole life, so each
process admits at most ``StreamLimits.max_streams`` of them at once and answers
503 with ``Retry-After`` beyond that: ordinary requests always keep threads.
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import weakref
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterator, Mapping

from sqlalchemy.engine import make_url

from ffworker.models import NOTIFY_CHANNEL as CHANNEL, TERMINAL_STATUSES

log = logging.getLogger("ffworker.events")

DEGRADED_POLL_S = 1.0
RECONNECT_MAX_S = 5.0
LISTENER_CHECK_S = 30.0
RETRY_MS = 2000              # the SSE `retry:` hint for reconnecting clients
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)


# -- limits -------------------------------------------------------------------

#: Threads of a gunicorn process, when gunicorn told us (see gunicorn_conf.post_worker_init).
_server_threads: int | None = None


def set_server_threads(threads: int) -> None:
    global _server_threads
    _server_threads = threads


def reserved_threads(threads: int) -> int:
    """Threads of a process kept free for ordinary requests: a quarter, at least 4."""
    return max(4, threads // 4)


def default_max_streams(threads: int) -> int:
    return max(0, threads - reserved_threads(threads))


@dataclass(frozen=True)
class StreamLimits:
    max_streams: int = 24           # open streams + long-polls per process
    keepalive_s: float = 15.0       # a comment line this often: detects dead clients
    max_duration_s: float = 900.0   # then the stream ends; clients resume with Last-Event-ID
    retry_after_s: int = 5          # Retry-After of the 503 beyond max_streams

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, threads: int | None = None) -> "StreamLimits":
        """``FFWORKER_SSE_MAX_STREAMS`` (default: the server's threads minus the reserve),
        ``FFWORKER_SSE_KEEPALIVE_S``, ``FFWORKER_SSE_MAX_DURATION_S``."""
        environ = os.environ if environ is None else environ
        threads = threads if threads is not None else _server_threads
        raw = environ.get("FFWORKER_SSE_MAX_STREAMS")
        if raw:
            max_streams = int(raw)
            if threads is not None and max_streams > threads - 1:
                log.warning("event=sse_limit_clamped requested=%s threads=%s allowed=%s",
                            max_streams, threads, threads - 1)
                max_streams = max(0, threads - 1)
        elif threads is not None:
            max_streams = default_max_streams(threads)
        else:
            max_streams = cls.max_streams
        return cls(
            max_streams=max_streams,
            keepalive_s=float(environ.get("FFWORKER_SSE_KEEPALIVE_S") or cls.keepalive_s),
            max_duration_s=float(environ.get("FFWORKER_SSE_MAX_DURATION_S") or cls.max_duration_s),
        )


class Slots:
    """A per-process count of open streams and long-polls, capped."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open = 0
        self._lock = threading.Lock()

    @property
    def open(self) -> int:
        return self._open

    def try_acquire(self) -> bool:
        with self._lock:
            if self._open >= self.limit:
                return False
            self._open += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._open -= 1


# -- the listening connection and its subscribers --------------------------------


class Subscription:
    def __init__(self, hub: "NotificationHub", job_id: str) -> None:
        self.hub = hub
        self.job_id = job_id
        self._event = threading.Event()
        self.closed = False

    def clear(self) -> None:
        self._event.clear()

    def wake(self) -> None:
        self._event.set()

    def wait(self, timeout_s: float) -> bool:
        """Until a notification for the job (True) or ``timeout_s`` (False)."""
        if not self.hub.connected.is_set():
            timeout_s = min(timeout_s, DEGRADED_POLL_S)
        return self._event.wait(max(0.0, timeout_s))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.hub.unsubscribe(self)


@dataclass
class _Watch:
    """The subscribers of one job in this process, and its latest snapshot."""

    subscribers: set = field(default_factory=set)
    version: int = 0
    cached: tuple[int, Any] | None = None
    read_lock: threading.Lock = field(default_factory=threading.Lock)


_hubs: "weakref.WeakSet[NotificationHub]" = weakref.WeakSet()


def drain() -> None:
    """The process is shutting down: end every open stream and long-poll now.

    Clients resume on another process with Last-Event-ID (the stream) or poll
    again (the long-poll), instead of being cut at the server's graceful timeout.
    """
    for hub in list(_hubs):
        hub.drain()


def listen_dsn(database_url: str) -> str:
    """libpq's spelling of the SQLAlchemy URL."""
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


class NotificationHub:
    """One ``LISTEN ffworker_jobs`` connection per process, fanned out to subscribers.

    The listening thread starts with the first subscriber (and again in a
    forked child). ``read(job_id)`` returns (job row or None, its events).
    """

    def __init__(self, dsn: str, read: Callable[[str], Any]) -> None:
        self._dsn = dsn
        self._read = read
        self.draining = False
        self._reset()
        _hubs.add(self)

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._watches: dict[str, _Watch] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.connected = threading.Event()

    # -- subscribers ---------------------------------------------------------

    def subscribe(self, job_id) -> Subscription:
        self._ensure_listening()
        sub = Subscription(self, str(job_id))
        with self._lock:
            self._watches.setdefault(sub.job_id, _Watch()).subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            watch = self._watches.get(sub.job_id)
            if watch is not None:
                watch.subscribers.discard(sub)
                if not watch.subscribers:
                    del self._watches[sub.job_id]

    @property
    def subscriber_count(self) -> int:
        with self._lock:
            return sum(len(w.subscribers) for w in self._watches.values())

    def snapshot(self, job_id):
        """The job's current snapshot: read once per notification, shared by its subscribers."""
        job_id = str(job_id)
        with self._lock:
            watch = self._watches.get(job_id)
        if watch is None or not self.connected.is_set():
            return self._read(job_id)
        with watch.read_lock:
            with self._lock:
                version = watch.version
                cached = watch.cached
            if cached is not None and cached[0] == version:
                return cached[1]
            snapshot = self._read(job_id)
            with self._lock:
                if watch.cached is None or watch.cached[0] < version:
                    watch.cached = (version, snapshot)
            return snapshot

    # -- the listening thread -----------------------------------------------

    def _ensure_listening(self) -> None:
        if self._pid != os.getpid():  # a forked child: the parent's thread and socket are not ours
            self._reset()
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._listen_forever, name="ffworker-listen", daemon=True)
            self._thread.start()

    @property
    def application_name(self) -> str:
        """How the listening connection shows in pg_stat_activity: one per web process."""
        return f"ffworker-events {socket.gethostname()}:{os.getpid()}"[:63]

    def drain(self) -> None:
        self.draining = True
        self._wake_all()

    def wait_connected(self, timeout_s: float) -> bool:
        self._ensure_listening()
        return self.connected.wait(timeout_s)

    def close(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
        self.connected.clear()

    def _listen_forever(self) -> None:
        import psycopg

        delay = 0.25
        while not self._stop.is_set():
            try:
                with psycopg.connect(
                    self._dsn, autocommit=True, connect_timeout=5, application_name=self.application_name,
                    keepalives=1, keepalives_idle=30, keepalives_interval=10, keepalives_count=3,
                ) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.connected.set()
                    delay = 0.25
                    log.info("event=listening channel=%s", CHANNEL)
                    self._wake_all()  # catch up with whatever was committed while nobody listened
                    checked = time.monotonic()
                    while not self._stop.is_set():
                        for notify in conn.notifies(timeout=1.0):
                            self._dispatch(notify.payload)
                        if time.monotonic() - checked > LISTENER_CHECK_S:
                            conn.execute("SELECT 1")  # a dead connection raises here
                            checked = time.monotonic()
            except Exception as exc:
                if not self._stop.is_set():
                    log.warning("event=listen_failed error=%s retry_in_s=%.2f", type(exc).__name__, delay)
            finally:
                if self.connected.is_set():
                    self.connected.clear()
                    self._wake_all()  # subscribers switch to degraded polling
            self._stop.wait(delay)
            delay = min(RECONNECT_MAX_S, delay * 2)

    def _dispatch(self, payload: str) -> None:
        job_id, _, _kind = payload.partition(":")
        with self._lock:
            watch = self._watches.get(job_id)
            if watch is None:
                return
            watch.version += 1
            subscribers = list(watch.subscribers)
        for sub in subscribers:
            sub.wake()

    def _wake_all(self) -> None:
        with self._lock:
            subscribers = []
            for watch in self._watches.values():
                watch.version += 1
                subscribers.extend(watch.subscribers)
        for sub in subscribers:
            sub.wake()


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

    def __init__(self, hub: NotificationHub, limits: StreamLimits | None = None) -> None:
        self.hub = hub
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
                    self._limits = StreamLimits.from_env()
                if self._slots is None:
                    self._slots = Slots(self._limits.max_streams)
