"""Which OSErrors the worker retries: the errno table, one row per decision."""
from __future__ import annotations

import errno

import pytest

from ffworker.worker import OS_ERRORS, os_error_is_transient

DETERMINISTIC = ["ENOTDIR", "EISDIR", "EEXIST", "ENAMETOOLONG", "ENOENT", "ELOOP", "EACCES", "EPERM",
                 "EROFS", "EINVAL", "EFBIG", "EXDEV", "ENOTEMPTY"]
TRANSIENT = ["EIO", "ENOSPC", "EDQUOT", "EAGAIN", "EINTR", "ENOMEM", "ENFILE", "EMFILE", "EBUSY", "ESTALE",
             "ETIMEDOUT"]


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_errors_are_not_retried(name):
    code = getattr(errno, name)
    assert os_error_is_transient(OSError(code, "x")) is False


@pytest.mark.parametrize("name", TRANSIENT)
def test_transient_errors_are_retried(name):
    code = getattr(errno, name)
    assert os_error_is_transient(OSError(code, "x")) is True


def test_subclasses_are_classified_by_their_errno():
    assert os_error_is_transient(NotADirectoryError(errno.ENOTDIR, "x")) is False
    assert os_error_is_transient(FileExistsError(errno.EEXIST, "x")) is False
    assert os_error_is_transient(PermissionError(errno.EACCES, "x")) is False


def test_an_errno_missing_from_the_table_and_no_errno_at_all_are_retried():
    unknown = next(code for code in range(1, 200) if code not in OS_ERRORS and code in errno.errorcode)
    assert os_error_is_transient(OSError(unknown, "x")) is True
    assert os_error_is_transient(OSError("no errno")) is True
