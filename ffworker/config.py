"""Settings: every environment variable ffworker reads, parsed and checked once.

Every variable has a default that works on a stock Debian machine with a local
PostgreSQL (unix socket, role named after the OS user) and a local Redis. A
``Settings`` object is always valid: construction checks ranges, known values
and the relations between thresholds, so a bad deployment stops at start-up
(``settings_or_exit``) instead of misbehaving hours later (a reaper grace
shorter than the maintenance interval re-arms every round and never reaps).

Settings are passed explicitly: the Flask app holds one (``services().settings``)
and each process entry point builds one with ``Settings.from_env()``.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Mapping
from urllib.parse import urlsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

BROKER_SCHEMES = ("redis", "rediss", "sentinel", "amqp", "amqps", "pyamqp")
BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
MAX_PRESIGN_EXPIRES_S = 7 * 24 * 3600
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


class ConfigError(ValueError):
    """A setting is malformed, out of range, or inconsistent with another one."""


def _env(name: str) -> dict:
    """A variable without the FFWORKER_ prefix (names set by the platform, e.g. PORT)."""
    return {"env": name}


@dataclass(frozen=True)
class Settings:
    database_url: str = "postgresql+psycopg:///ffworker"
    broker_url: str = "redis://127.0.0.1:6379/0"
    media_root: Path = Path("var/media")
    stale_after_s: float = 60.0
    reaper_grace_s: float = 120.0
    progress_interval_s: float = 1.0
    job_timeout_s: int = 3600
    max_attempts: int = 3
    retention_days: int = 30
    maintenance_interval_s: float = 15.0
    allow_raw_commands: bool = False
    redispatch_after_s: float = 60.0
    task_queue: str = "ffworker"
    # Fair share (docs/ledger.md): running slots a tenant may use unless `manage.py tenants
    # set-limits` gave it its own; running jobs across the fleet (None: no global limit).
    tenant_max_slots: int = 5
    max_running: int | None = None
    # Behind a reverse proxy that sets X-Forwarded-Proto: honour it (the dashboard's cookie is
    # Secure when the proxy says https). Off: only the connection itself decides.
    trust_proxy: bool = False
    # Lifts the SSRF guard of webhook URLs and URL inputs (ffworker/urlguard.py): for tests and
    # private deployments.
    allow_private_urls: bool = False
    # Inputs may be https:// URLs, downloaded by the worker (ffworker/fetch.py); http:// too
    # with allow_http_inputs.
    allow_url_inputs: bool = False
    allow_http_inputs: bool = False
    # The largest file ffworker takes in (10 GiB): a files API upload (413 beyond) and each
    # downloaded URL input.
    max_upload_bytes: int = 10 * 1024 ** 3
    # Object storage (docs/storage.md): s3://bucket/prefix makes a bucket the media store
    # instead of media_root; endpoint, region and credentials come from boto3's own AWS_*
    # variables. None: the local media root.
    storage_url: str | None = None
    # How long a result's presigned download URL stays valid (SigV4 allows at most 7 days).
    presign_expires_s: int = 3600
    # The bucket's address as clients reach it, when it differs from the workers' AWS_ENDPOINT_URL.
    storage_public_url: str | None = None
    # What one run may download into its local scratch directory in object-storage mode.
    scratch_max_bytes: int = 50 * 1024 ** 3
    ffmpeg: str = "ffmpeg"
    ffprobe: str = "ffprobe"
    # None: the web process's threads minus the reserve kept for ordinary requests.
    sse_max_streams: int | None = None
    sse_keepalive_s: float = 15.0
    sse_max_duration_s: float = 900.0
    web_threads: int = 32
    # None: min(4, CPUs + 1), see web_processes().
    web_concurrency: int | None = field(default=None, metadata=_env("WEB_CONCURRENCY"))
    port: int = field(default=8000, metadata=_env("PORT"))

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def env_name(cls, name: str) -> str:
        """The environment variable behind field ``name``."""
        return _field(cls, name).metadata.get("env") or f"FFWORKER_{name.upper()}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        """The settings of ``environ`` (default: this process's); raises ConfigError."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            raw = environ.get(cls.env_name(f.name))
            if raw is not None and raw.strip() != "":
                values[f.name] = _convert(f.type, raw.strip(), cls.env_name(f.name))
        return cls(**values)

    def with_overrides(self, **changes) -> "Settings":
        return replace(self, **changes)

    def web_processes(self) -> int:
        return self.web_concurrency or min(4, (os.cpu_count() or 1) + 1)

    def validate(self) -> None:
        """Raise ConfigError naming the first variable that is out of range or inconsistent."""
        for name in POSITIVE:
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                self._fail(name, "must be a positive number")
        if self.sse_max_streams is not None and self.sse_max_streams < 0:
            self._fail("sse_max_streams", "must be 0 or more (0 turns event streams and long-polls off)")
        if not 1 <= self.port <= 65535:
            self._fail("port", "must be a TCP port (1-65535)")
        for name in ("task_queue", "ffmpeg", "ffprobe"):
            if not str(getattr(self, name)).strip():
                self._fail(name, "must not be empty")
        if not str(self.media_root).strip():
            self._fail("media_root", "must not be empty")
        self._check_urls()
        self._check_relations()

    def _check_urls(self) -> None:
        try:
            backend = make_url(self.database_url).get_backend_name()
        except ArgumentError:
            self._fail("database_url", "is not a database URL (postgresql+psycopg://user@host/dbname)")
        if backend != "postgresql":
            self._fail("database_url", "must be a PostgreSQL URL (postgresql+psycopg://…)")
        if urlsplit(self.broker_url).scheme not in BROKER_SCHEMES:
            self._fail("broker_url", f"must use one of the schemes {', '.join(BROKER_SCHEMES)}")
        if self.storage_url is not None:
            parts = urlsplit(self.storage_url)
            if parts.scheme != "s3" or not BUCKET_NAME.fullmatch(parts.netloc) or parts.query or parts.fragment:
                self._fail("storage_url", "must be s3://bucket or s3://bucket/prefix (a bucket name of 3-63 "
                                          "lowercase letters, digits, dots and hyphens)")
        if self.storage_public_url is not None:
            parts = urlsplit(self.storage_public_url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                self._fail("storage_public_url", "must be an http(s) URL (the bucket's endpoint as clients reach it)")

    def _check_relations(self) -> None:
        # A grace not longer than the interval re-arms on every round: the reaper would never reap.
        if not self.reaper_grace_s > self.maintenance_interval_s:
            self._fail("reaper_grace_s", f"must be greater than {self._show('maintenance_interval_s')}")
        # Three heartbeats per stale window: one late heartbeat must not get a live job reaped.
        if not self.stale_after_s >= 3 * self.progress_interval_s:
            self._fail("stale_after_s", f"must be at least 3 × {self._show('progress_interval_s')}")
        # Said at start-up rather than found out when every http input is refused.
        if self.allow_http_inputs and not self.allow_url_inputs:
            self._fail("allow_http_inputs", f"needs {self.env_name('allow_url_inputs')}=1")
        if self.presign_expires_s > MAX_PRESIGN_EXPIRES_S:
            self._fail("presign_expires_s", f"must be at most {MAX_PRESIGN_EXPIRES_S} (7 days, SigV4's limit)")
        if self.storage_public_url is not None and self.storage_url is None:
            self._fail("storage_public_url", f"needs {self.env_name('storage_url')}=s3://bucket/prefix")

    def _show(self, name: str) -> str:
        value = _spell(getattr(self, name))
        if name.endswith("_url"):
            value = _without_password(value)
        return f"{self.env_name(name)}={value}"

    def _fail(self, name: str, rule: str):
        raise ConfigError(f"{self._show(name)} {rule}")


#: Settings that must be positive (counts, durations, sizes); None means "derived".
POSITIVE = (
    "stale_after_s", "reaper_grace_s", "progress_interval_s", "job_timeout_s", "max_attempts",
    "retention_days", "maintenance_interval_s", "redispatch_after_s", "sse_keepalive_s",
    "sse_max_duration_s", "web_threads", "web_concurrency", "max_upload_bytes",
    "presign_expires_s", "scratch_max_bytes",
    "tenant_max_slots", "max_running",
)

#: What a running job of each kind costs its tenant's slots. A probe or a thumbnail reads a
#: little and decodes a frame or two; a transcode, concat or command keeps ffmpeg's encoder
#: threads busy for the whole media duration; HLS encodes every rendition of a ladder at once.
#: A job costing more than its tenant's slots runs alone (docs/ledger.md, "Fair share").
KIND_SLOTS = {"probe": 1, "thumbnail": 1, "transcode": 2, "concat": 2, "command": 2, "hls": 3}


def settings_or_exit(environ: Mapping[str, str] | None = None) -> Settings:
    """For process entry points: the settings, or one line on stderr and a non-zero exit."""
    try:
        return Settings.from_env(environ)
    except ConfigError as exc:
        raise SystemExit(f"ffworker: configuration error: {exc}") from None


def _field(cls, name: str):
    return next(f for f in fields(cls) if f.name == name)


def _convert(type_name: str, raw: str, variable: str):
    kind = type_name.replace(" | None", "")
    if kind == "bool":
        return _flag(raw, variable)
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        what = "a whole number" if kind == "int" else "a number"
        raise ConfigError(f"{variable}={raw} is not {what}") from None
    if kind == "Path":
        return Path(raw)
    return raw


def _flag(raw: str, variable: str) -> bool:
    word = raw.lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ConfigError(f"{variable}={raw} must be one of {', '.join(TRUE_WORDS + FALSE_WORDS)}")


def _spell(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _without_password(url: str) -> str:
    """Error lines end up in logs: never with a password in them."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()
