"""Database engines, one per process and URL."""
from __future__ import annotations

import threading

from sqlalchemy import Engine, create_engine

# Server-side limits of every ffworker session (seconds). Every ledger write is one
# statement that holds its row for milliseconds, so these only ever end something
# abnormal — above all a "frozen writer": a process stopped (SIGSTOP, swapped out, a
# debugger) inside an open transaction, whose row lock would otherwise block the
# reaper and cancel until the process dies.
#   idle in transaction: the server ends such a session, releasing its locks;
#   lock wait: a write queued behind a lock gives up instead of queueing for ever;
#   statement: a runaway query (a report on a huge ledger) cannot hold locks for hours.
IDLE_IN_TRANSACTION_TIMEOUT_S = 10
LOCK_TIMEOUT_S = 10
STATEMENT_TIMEOUT_S = 120
SESSION_OPTIONS = " ".join((
    f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_TIMEOUT_S * 1000}",
    f"-c lock_timeout={LOCK_TIMEOUT_S * 1000}",
    f"-c statement_timeout={STATEMENT_TIMEOUT_S * 1000}",
))

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
                connect_args={"application_name": "ffworker", "options": SESSION_OPTIONS},
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
