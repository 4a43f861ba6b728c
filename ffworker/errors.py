"""Typed outcomes of ledger writes that matched no row."""
from __future__ import annotations


class LedgerError(Exception):
    """A guarded ledger write found the job not in the state it requires."""

    def __init__(self, job_id, message: str) -> None:
        super().__init__(message)
        self.job_id = job_id


class JobNotFound(LedgerError):
    """No such job (or not the caller tenant's)."""


class NotClaimable(LedgerError):
    """The job is not queued, or not due yet: a duplicate or early message.

    ``reason`` is ``not_due`` (queued, due in ``due_in_s`` seconds by the database's
    clock: the message came early and must be sent again), ``not_queued`` (running or
    ended: a duplicate), or ``absent``.
    """

    def __init__(self, job_id, message: str, *, reason: str = "not_queued", due_in_s: float | None = None) -> None:
        super().__init__(job_id, message)
        self.reason = reason
        self.due_in_s = due_in_s


class FencedOut(LedgerError):
    """The run lost the job: its attempt is no longer the running one."""


class AlreadyTerminal(LedgerError):
    """The job already completed, failed or was cancelled."""


class NotRetryable(LedgerError):
    """Only a failed or cancelled job can be retried."""


class JobBusy(LedgerError):
    """Another session holds the job's row past the short wait a request allows."""
