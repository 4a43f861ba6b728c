"""How many event streams and long-polls a web process admits at once.

An open stream or long-poll holds a server thread for its whole life, so each
process admits at most ``StreamLimits.max_streams`` of them at once and answers
503 with ``Retry-After`` beyond that: ordinary requests always keep threads.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from ffworker.config import Settings

log = logging.getLogger("ffworker.stream_slots")

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
    def from_settings(cls, settings: Settings, threads: int | None = None) -> "StreamLimits":
        """The limits for a process with ``threads`` server threads (default: what gunicorn
        told us, if anything): ``FFWORKER_SSE_MAX_STREAMS`` is kept below the thread count."""
        threads = threads if threads is not None else _server_threads
        max_streams = settings.sse_max_streams
        if max_streams is not None:
            if threads is not None and max_streams > threads - 1:
                log.warning("event=sse_limit_clamped requested=%s threads=%s allowed=%s",
                            max_streams, threads, threads - 1)
                max_streams = max(0, threads - 1)
        elif threads is not None:
            max_streams = default_max_streams(threads)
        else:
            max_streams = cls.max_streams
        return cls(max_streams=max_streams, keepalive_s=settings.sse_keepalive_s,
                   max_duration_s=settings.sse_max_duration_s)


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
