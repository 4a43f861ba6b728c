"""URL inputs: which input URLs a server accepts, and downloading one for a run.

With ``FFWORKER_ALLOW_URL_INPUTS=1`` an input field may hold an ``https://`` URL
(``http://`` too with ``FFWORKER_ALLOW_HTTP_INPUTS=1``). The worker downloads it
itself, never ffmpeg: no network protocol reaches ffmpeg, and every connection goes
through the SSRF guard webhooks use (``urlguard.py``), at submit time on the URL as
written and at every connection on the address actually connected to, redirects
included (at most ``MAX_REDIRECTS``, each checked like the first URL).

A download that fails says whether retrying may help: 5xx answers, timeouts and
broken connections may pass (transient); 4xx answers, refused addresses, too many
redirects and bodies over the size cap will not (deterministic).
"""
from __future__ import annotations

import http.client
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from ffworker import urlguard

MAX_REDIRECTS = 3
# Per socket operation (connect, each read): a server that stops sending is given up on
# after this long, whatever the job's own timeout.
SOCKET_TIMEOUT_S = 30.0
CHUNK_BYTES = 1024 * 1024
# How soon a blocked read notices a cancel, a lost fence or the job's deadline.
WATCH_INTERVAL_S = 0.1
REDIRECTS = (301, 302, 303, 307, 308)
_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,8}$")


class FetchFailed(Exception):
    """The input could not be downloaded; ``retryable`` when another attempt may succeed."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable


class FetchStopped(Exception):
    """The download was stopped from outside (cancel, lost fence) or ran out of the job's time."""


def is_url(value: object) -> bool:
    """Whether an input field holds a URL rather than a path (any ``word://`` form counts,
    so that ``ftp://`` is refused as a URL, not reported as a missing file)."""
    return isinstance(value, str) and re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*://", value) is not None


@dataclass(frozen=True)
class UrlPolicy:
    """The URL-input settings of a process (``Settings``: allow_url_inputs, allow_http_inputs,
    allow_private_urls)."""

    allowed: bool = False
    allow_http: bool = False
    allow_private: bool = False

    @classmethod
    def from_settings(cls, settings) -> "UrlPolicy":
        return cls(settings.allow_url_inputs, settings.allow_http_inputs, settings.allow_private_urls)

    def check(self, url: str) -> str:
        """Refuse (``urlguard.BlockedURL``) a URL this server does not download; returns it."""
        if not self.allowed:
            raise urlguard.BlockedURL("is not accepted: URL inputs are not enabled on this server")
        scheme = urlsplit(url).scheme.lower() if isinstance(url, str) else ""
        if scheme == "http" and not self.allow_http:
            raise urlguard.BlockedURL("must be an https URL (http inputs are not enabled on this server)")
        if scheme not in ("http", "https"):
            raise urlguard.BlockedURL("must be an https URL")
        return urlguard.check_url_literal(url, allow_private=self.allow_private)


def scratch_dir(job_id: str, attempt: int) -> Path:
    """A new directory for one run's downloads, in the system's temporary directory
    (``TMPDIR``); an earlier attempt's directory, left by a worker killed outright, goes first.
    """
    base = Path(tempfile.gettempdir())
    for old in base.glob(f"ffworker-{job_id}.*"):
        earlier = old.name.split(".")
        if len(earlier) == 3 and earlier[1].isdigit() and int(earlier[1]) < attempt:
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"ffworker-{job_id}.{attempt}.", dir=base))


def download(url: str, directory: Path, index: int, *, policy: UrlPolicy, max_bytes: int,
             deadline: float, stop: threading.Event | None = None) -> Path:
    """Download ``url`` into ``directory`` as ``input-<index><suffix>``; the path.

    Raises FetchFailed (with ``retryable``), or FetchStopped when ``stop`` is set or the
    monotonic ``deadline`` passes. A partial file is removed before raising.
    """
    def stopped() -> bool:
        return (stop is not None and stop.is_set()) or time.monotonic() >= deadline

    current = url
    for _ in range(MAX_REDIRECTS + 1):
        try:
            policy.check(current)
        except urlguard.BlockedURL as exc:
            raise FetchFailed(_said(url, current, str(exc)), retryable=False) from None
        timeout = max(0.001, min(SOCKET_TIMEOUT_S, deadline - time.monotonic()))
        connection, target = urlguard.open_connection(current, timeout, allow_private=policy.allow_private)
        try:
            with _interrupted_on(stopped, connection):
                try:
                    connection.request("GET", target, headers={"User-Agent": "ffworker", "Accept-Encoding": "identity"})
                    response = connection.getresponse()
                except urlguard.BlockedURL as exc:
                    raise FetchFailed(_said(url, current, str(exc)), retryable=False) from None
                except (OSError, http.client.HTTPException) as exc:
                    if stopped():
                        raise FetchStopped() from None
                    raise FetchFailed(_said(url, current, f"could not be read ({_reason(exc)})"),
                                      retryable=True) from None
                if response.status in REDIRECTS:
                    location = response.getheader("Location")
                    if not location:
                        raise FetchFailed(_said(url, current, f"answered {response.status} without a Location"),
                                          retryable=False)
                    current = urljoin(current, location.strip())
                    continue
                if response.status >= 500:
                    raise FetchFailed(_said(url, current, f"answered {response.status}"), retryable=True)
                if response.status != 200:
                    raise FetchFailed(_said(url, current, f"answered {response.status}"), retryable=False)
                declared = response.getheader("Content-Length")
                if declared and declared.isdigit() and int(declared) > max_bytes:
                    raise FetchFailed(_said(url, current, f"is larger than the {max_bytes} bytes an input may have"),
                                      retryable=False)
                path = directory / f"input-{index}{_suffix(current)}"
                _save(response, path, url, current, max_bytes, stopped)
                return path
        finally:
            connection.close()
    raise FetchFailed(f"input {url!r}: more than {MAX_REDIRECTS} redirects", retryable=False)


@contextmanager
def _interrupted_on(stopped, connection):
    """A read blocked on a server that sends nothing must not outlast a cancel or the job's
    deadline by up to SOCKET_TIMEOUT_S: a watcher shuts the socket down, which ends the
    read at once (the caller then sees ``stopped()``)."""
    done = threading.Event()

    def watch() -> None:
        while not done.wait(WATCH_INTERVAL_S):
            if stopped():
                sock = connection.sock
                if sock is not None:
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                return

    watcher = threading.Thread(target=watch, name="fetch-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()


def _save(response, path: Path, url: str, current: str, max_bytes: int, stopped) -> None:
    size = 0
    try:
        with open(path, "xb") as out:
            while True:
                if stopped():
                    raise FetchStopped()
                try:
                    # read1: whatever has arrived (up to a chunk), so a slow server's bytes are
                    # written as they come and the stop is checked between them.
                    chunk = response.read1(CHUNK_BYTES)
                except (OSError, http.client.HTTPException) as exc:
                    if stopped():
                        raise FetchStopped() from None
                    raise FetchFailed(_said(url, current, f"broke off ({_reason(exc)})"), retryable=True) from None
                if not chunk:
                    if stopped():
                        raise FetchStopped()
                    break
                size += len(chunk)
                if size > max_bytes:
                    raise FetchFailed(_said(url, current, f"is larger than the {max_bytes} bytes an input may have"),
                                      retryable=False)
                out.write(chunk)
    except BaseException:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        raise


def _suffix(url: str) -> str:
    """The URL path's extension (ffmpeg's muxer guesses use it), when it is a plain one."""
    match = _SUFFIX.search(urlsplit(url).path)
    return match.group(0).lower() if match else ""


def _said(url: str, current: str, what: str) -> str:
    where = f"input {url!r}" if current == url else f"input {url!r} (redirected to {current!r})"
    return f"{where} {what}"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return type(exc).__name__
