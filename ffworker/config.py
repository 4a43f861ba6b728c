"""Settings, read once from the environment.

Every variable has a default that works on a stock Debian machine with a local
PostgreSQL (unix socket, role named after the OS user) and a local Redis.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path


def _flag(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


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
    allow_private_urls: bool = False  # lift the SSRF guard of webhook URLs (ffworker/urlguard.py)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "Settings":
        environ = os.environ if environ is None else environ
        values = {}
        for field in fields(cls):
            raw = environ.get(f"FFWORKER_{field.name.upper()}")
            if raw is None or raw == "":
                continue
            values[field.name] = _convert(field.type, raw, field.name)
        return cls(**values)

    def with_overrides(self, **changes) -> "Settings":
        return replace(self, **changes)


def _convert(type_name: str, raw: str, name: str):
    try:
        if type_name == "bool":
            return _flag(raw)
        if type_name == "int":
            return int(raw)
        if type_name == "float":
            return float(raw)
        if type_name == "Path":
            return Path(raw)
        return raw
    except ValueError as exc:
        raise ValueError(f"FFWORKER_{name.upper()}={raw!r} is not a valid {type_name}") from exc


_current: Settings | None = None


def get_settings() -> Settings:
    """The process-wide settings (read from the environment on first use)."""
    global _current
    if _current is None:
        _current = Settings.from_env()
    return _current


def set_settings(settings: Settings) -> None:
    global _current
    _current = settings
