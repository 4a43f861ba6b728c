"""The one listening connection of a web process: ``NotificationHub``.

Every ledger transition and progress write runs ``pg_notify('ffworker_jobs',
'<job id>:status|progress')`` inside its transaction, so PostgreSQL delivers it
exactly when the change is committed; a submission does not (nobody can follow a
job before its id is returned). Each web process holds ONE listening
connection, whatever the number of clients; a notification wakes only the
clients that follow that job, and they read the job once per notification per
process (a small snapshot cache), never on a timer. Without the listening
connection (the database restarting, say), subscribers fall back to reading
every ``DEGRADED_POLL_S`` until it is back, and the hub wakes every subscriber
when it reconnects so nothing committed meanwhile is missed.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

from sqlalchemy.engine import make_url

from ffworker.models import NOTIFY_CHANNEL as CHANNEL

log = logging.getLogger("ffworker.listener")

DEGRADED_POLL_S = 1.0
RECONNECT_MAX_S = 5.0
LISTENER_CHECK_S = 30.0


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
