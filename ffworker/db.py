"""Database engines, one per process and URL."""
from __future__ import annotations

import threading

from sqlalchemy import Engine, create_engine

_engines: dict[str, Engine] = {}
_lock = threading.Lock()


def get_engine(url: str) -> Engine:
    """A pooled engine for ``url``, created on first use in this process.

    Celery's prefork pool forks after import, so engines are created lazily and
    dropped after a fork (see ``dispose_after_fork``) rather than shared.
    """
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = create_engine(
                url,
                pool_pre_ping=True,
                # At most 15 connections per process, each kept once opened: an overflow
                # connection is closed on return, so a web process serving more requests at
                # once than pool_size would open and close a connection per request.
                pool_size=15,
                max_overflow=0,
                connect_args={"application_name": "ffworker"},
            )
            _engines[url] = engine
        return engine


def dispose_after_fork() -> None:
    """Forget inherited connections in a freshly forked child process."""
    with _lock:
        for engine in _engines.values():
            engine.dispose(close=False)
        _engines.clear()


def dispose_all() -> None:
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
