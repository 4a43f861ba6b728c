"""Which failures the worker retries: the errno table, one row per decision, and the
object-storage bucket's answers."""
from __future__ import annotations

import errno

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError
from s3transfer.exceptions import RetriesExceededError, S3DownloadFailedError

from ffworker import staging
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


# -- the bucket's answers (object storage) ------------------------------------------------

def _answer(code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "x"}}, "PutObject")


@pytest.mark.parametrize("code", ["AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket",
                                  "AllAccessDisabled"])
def test_a_bucket_refusing_the_credentials_or_gone_is_not_retried(code):
    failure = staging.as_failure(_answer(code), "output 'a.mp4' could not be uploaded", "storage_unavailable")
    assert (failure.code, failure.retryable) == ("storage_unavailable", False)
    assert failure.message == f"output 'a.mp4' could not be uploaded ({code})"


@pytest.mark.parametrize("error", [
    _answer("SlowDown"), _answer("InternalError"), _answer("ServiceUnavailable"), _answer("RequestTimeout"),
    _answer("SomethingNew"), EndpointConnectionError(endpoint_url="http://s3"),
    ReadTimeoutError(endpoint_url="http://s3"), RetriesExceededError(OSError()), S3DownloadFailedError("etag"),
], ids=lambda error: error.response["Error"]["Code"] if isinstance(error, ClientError) else type(error).__name__)
def test_throttling_server_errors_and_broken_connections_are_retried(error):
    failure = staging.as_failure(error, "input 'a.mp4' could not be downloaded", "input_unavailable")
    assert (failure.code, failure.retryable) == ("input_unavailable", True)


def test_an_error_of_the_scratch_disk_is_left_to_the_os_error_table():
    disk_full = OSError(errno.ENOSPC, "No space left on device")
    assert staging.as_failure(disk_full, "input 'a.mp4' could not be downloaded", "input_unavailable") is disk_full
