"""The dashboard's live updates: ONE event stream per page, covering the jobs it shows.

``EventSource`` cannot send a Bearer header, so the stream is authenticated by the
session cookie. Once a second (``TICK_S``) the stream reads the jobs the page watches
(primary-key lookups) and — on a listing's first page — the jobs of the page's filter
created since it was rendered (one indexed page read): a submission needs no NOTIFY, and
a new job shows within about a second. It sends a ``job`` event for each job whose row
changed (``updated_at``), with the row rendered as the page renders it.

An open stream holds a server thread, so it takes one of the process's stream slots
(``ffworker.stream_slots``: the same cap as ``GET /v1/jobs/{id}/events``) and answers
503 when none is free. It ends like the REST stream (``ffworker.sse``): after the
maximum duration, or at once when the process drains its streams on shutdown.
"""
from __future__ import annotations

import json
import logging
import time
from datetime import timedelta
from typing import Callable, Iterator, Mapping

from flask import current_app

from ffworker.models import TERMINAL_STATUSES
from ffworker.sse import KEEPALIVE, RETRY_MS, Events
from ffworker.stream_slots import Slots, StreamLimits
from ffworker.ui import queries

log = logging.getLogger("ffworker.ui")

TICK_S = 1.0
MAX_WATCHED = 200
# A job committed just after the page read the list may carry an earlier created_at
# (its transaction's start): look a little further back, and skip the ids already known.
SINCE_MARGIN = timedelta(seconds=5)


def stream_state() -> Events:
    """The process's listening hub, stream limits and slots (shared with the REST event streams)."""
    return current_app.extensions["ffworker_events"]


class PageStream:
    """The body of one ``GET /ui/stream`` response; ``close()`` frees the slot."""

    def __init__(self, engine, slots: Slots, limits: StreamLimits, ids: list[str], tenant_id,
                 newer: tuple[Mapping, object] | None, render: Callable[[dict], dict],
                 draining: Callable[[], bool], end_when_terminal: bool) -> None:
        self.engine = engine
        self.slots = slots
        self.limits = limits
        self.ids = list(dict.fromkeys(ids))[:MAX_WATCHED]
        self.tenant_id = tenant_id
        self.newer = (newer[0], newer[1] - SINCE_MARGIN) if newer else None
        self.render = render
        self.draining = draining
        self.end_when_terminal = end_when_terminal
        self.seen: dict[str, object] = {}
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        started = last_write = time.monotonic()
        yield f"retry: {RETRY_MS}\n\n".encode()
        while not self._closed:
            try:
                current, fresh = queries.watched(self.engine, self.ids, self.tenant_id, self.newer,
                                                 set(self.ids))
            except Exception as exc:  # the ledger is away: end; EventSource reconnects
                log.warning("event=ui_stream_read_failed error=%s", type(exc).__name__)
                return
            for row in reversed(fresh):  # oldest first: each lands on top of the list
                key = str(row["id"])
                if len(self.ids) < MAX_WATCHED:
                    self.ids.append(key)
                self.seen[key] = row["updated_at"]
                yield _event("job", {**self.render(row), "new": True})
                last_write = time.monotonic()
            for row in current:
                key = str(row["id"])
                if self.seen.get(key) != row["updated_at"]:
                    self.seen[key] = row["updated_at"]
                    yield _event("job", self.render(row))
                    last_write = time.monotonic()
            if self.end_when_terminal and current and all(r["status"] in TERMINAL_STATUSES for r in current):
                yield _event("end", {})
                return
            now = time.monotonic()
            if now - started > self.limits.max_duration_s or self.draining():
                return  # EventSource reconnects and picks up from the rows as they are
            if now - last_write >= self.limits.keepalive_s:
                yield KEEPALIVE
                last_write = now
            time.sleep(TICK_S)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.slots.release()


def _event(name: str, data: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'), default=str)}\n\n".encode()
