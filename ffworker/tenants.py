"""Tenants and their API keys. Keys are random, shown once, stored as a SHA-256 hash.

A key carries 32 random bytes, so a fast hash is enough: there is nothing to
brute-force, unlike a password.
"""
from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, bindparam, func, insert, select, update

from ffworker.models import ApiKey, Tenant

KEY_PREFIX = "ffw_"
PREFIX_CHARS = 12
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")

tenants = Tenant.__table__
api_keys = ApiKey.__table__


class TenantError(ValueError):
    pass


@dataclass(frozen=True)
class AuthenticatedTenant:
    id: object
    name: str


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def create_tenant(engine: Engine, name: str, media_root: Path) -> tuple[AuthenticatedTenant, str]:
    if not NAME_PATTERN.match(name):
        raise TenantError("tenant names are 1-63 characters of a-z, 0-9, '-' and '_', starting with a letter or digit")
    with engine.begin() as conn:
        if conn.execute(select(tenants.c.id).where(tenants.c.name == name)).first():
            raise TenantError(f"tenant {name!r} already exists")
        tenant_id = conn.execute(insert(tenants).values(name=name).returning(tenants.c.id)).scalar_one()
        key = _insert_key(conn, tenant_id)
    (Path(media_root) / name).mkdir(parents=True, exist_ok=True)
    return AuthenticatedTenant(tenant_id, name), key


def issue_key(engine: Engine, name: str) -> str:
    with engine.begin() as conn:
        tenant_id = conn.execute(select(tenants.c.id).where(tenants.c.name == name)).scalar()
        if tenant_id is None:
            raise TenantError(f"no tenant named {name!r}")
        return _insert_key(conn, tenant_id)


def _insert_key(conn, tenant_id) -> str:
    key = new_key()
    conn.execute(insert(api_keys).values(tenant_id=tenant_id, prefix=key[:PREFIX_CHARS], key_sha256=hash_key(key)))
    return key


RATE_PATTERN = re.compile(r"^\s*(\d+)\s*(?:/\s*min)?\s*$")


def parse_rate(text: str) -> int | None:
    """``N/min`` (or ``N``) → N; ``none`` → None (no rate limit)."""
    if text.strip().lower() in ("none", "off", "-"):
        return None
    match = RATE_PATTERN.match(text)
    if match is None or int(match.group(1)) < 1:
        raise TenantError(f"rate {text!r}: give N/min with N ≥ 1, or none")
    return int(match.group(1))


_UNSET = object()


def set_limits(engine: Engine, name: str, *, slots=_UNSET, rate=_UNSET) -> dict:
    """Set a tenant's running slots and starts per minute (None: back to the default / no
    rate limit). The next claim applies them; running jobs are never stopped by a lower limit."""
    values = {}
    if slots is not _UNSET:
        if slots is not None and slots < 1:
            raise TenantError("slots must be 1 or more")
        values["max_slots"] = slots
    if rate is not _UNSET:
        values["rate_per_min"] = rate
    with engine.begin() as conn:
        statement = update(tenants).where(tenants.c.name == name)
        if values:
            statement = statement.values(**values)
        else:
            statement = statement.values(name=tenants.c.name)
        row = conn.execute(statement.returning(tenants.c.max_slots, tenants.c.rate_per_min)).mappings().first()
    if row is None:
        raise TenantError(f"no tenant named {name!r}")
    return dict(row)


def list_tenants(engine: Engine) -> list[dict]:
    query = (
        select(tenants.c.name, tenants.c.created_at, tenants.c.max_slots, tenants.c.rate_per_min,
               api_keys.c.prefix, api_keys.c.created_at.label("key_created_at"),
               api_keys.c.revoked_at)
        .select_from(tenants.outerjoin(api_keys, api_keys.c.tenant_id == tenants.c.id))
        .order_by(tenants.c.name, api_keys.c.created_at)
    )
    with engine.connect() as conn:
        return [dict(row) for row in conn.execute(query).mappings()]


def revoke_key(engine: Engine, key_or_prefix: str) -> int:
    """Revoke a key, named whole or by the prefix `tenants list` shows; returns how many."""
    if len(key_or_prefix) > PREFIX_CHARS:
        match = api_keys.c.key_sha256 == hash_key(key_or_prefix)
    elif len(key_or_prefix) >= len(KEY_PREFIX) + 6:
        match = api_keys.c.prefix.startswith(key_or_prefix, autoescape=True)
    else:
        raise TenantError(f"give the key or at least {len(KEY_PREFIX) + 6} characters of it (see `tenants list`)")
    with engine.begin() as conn:
        result = conn.execute(
            update(api_keys).where(match, api_keys.c.revoked_at.is_(None)).values(revoked_at=func.now())
        )
        return result.rowcount


_AUTHENTICATE = (
    select(tenants.c.id, tenants.c.name)
    .select_from(api_keys.join(tenants, tenants.c.id == api_keys.c.tenant_id))
    .where(api_keys.c.key_sha256 == bindparam("key_sha256"), api_keys.c.revoked_at.is_(None))
)


def authenticate(engine: Engine, key: str) -> AuthenticatedTenant | None:
    # Every API request runs this: a statement built once, one round trip (no BEGIN/ROLLBACK).
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        row = conn.execute(_AUTHENTICATE, {"key_sha256": hash_key(key)}).first()
    return AuthenticatedTenant(row.id, row.name) if row else None
