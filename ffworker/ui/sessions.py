"""Dashboard sign-in: server-side sessions and CSRF tokens.

The browser's cookie holds only a random session id (32 bytes); the database keeps
its SHA-256, whom it signed in (the tenant API key or the operator, never the key
itself), its CSRF token and its expiry. Revoking the key (``tenants revoke-key``,
``operators revoke``) ends its sessions at once: every request joins the key.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Engine, bindparam, delete, func, insert, select

from ffworker.models import ApiKey, Operator, Tenant, UiSession
from ffworker.tenants import hash_key

COOKIE = "ffw_session"
LOGIN_COOKIE = "ffw_login"      # the sign-in form's CSRF token (double submit), before any session
LIFETIME = timedelta(hours=12)  # absolute: then sign in again

sessions = UiSession.__table__
api_keys = ApiKey.__table__
tenants = Tenant.__table__
operators = Operator.__table__


@dataclass(frozen=True)
class Viewer:
    """Who is signed in: a tenant (sees its own jobs) or an operator (sees every tenant)."""

    name: str
    tenant_id: object | None
    csrf_token: str
    session_hash: str

    @property
    def is_operator(self) -> bool:
        return self.tenant_id is None


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


def tokens_match(given: str | None, expected: str | None) -> bool:
    return bool(given) and bool(expected) and hmac.compare_digest(given.encode(), expected.encode())


def sign_in(engine: Engine, key: str) -> str | None:
    """A new session id for a valid tenant API key or operator key, else None."""
    digest = hash_key(key)
    with engine.begin() as conn:
        principal = {}
        key_id = conn.execute(select(api_keys.c.id).where(
            api_keys.c.key_sha256 == digest, api_keys.c.revoked_at.is_(None))).scalar()
        if key_id is not None:
            principal["api_key_id"] = key_id
        else:
            operator_id = conn.execute(select(operators.c.id).where(
                operators.c.key_sha256 == digest, operators.c.revoked_at.is_(None))).scalar()
            if operator_id is None:
                return None
            principal["operator_id"] = operator_id
        conn.execute(delete(sessions).where(sessions.c.expires_at < func.now()))  # indexed; usually none
        session_id = secrets.token_urlsafe(32)
        conn.execute(insert(sessions).values(
            id_sha256=_digest(session_id), csrf_token=new_token(), expires_at=func.now() + LIFETIME, **principal))
    return session_id


_LOOKUP = (
    select(sessions.c.id_sha256, sessions.c.csrf_token, tenants.c.id.label("tenant_id"),
           tenants.c.name.label("tenant_name"), operators.c.name.label("operator_name"))
    .select_from(
        sessions
        .outerjoin(api_keys, (api_keys.c.id == sessions.c.api_key_id) & api_keys.c.revoked_at.is_(None))
        .outerjoin(tenants, tenants.c.id == api_keys.c.tenant_id)
        .outerjoin(operators, (operators.c.id == sessions.c.operator_id) & operators.c.revoked_at.is_(None))
    )
    .where(sessions.c.id_sha256 == bindparam("digest"), sessions.c.expires_at > func.now())
)


def lookup(engine: Engine, session_id: str | None) -> Viewer | None:
    if not session_id or len(session_id) > 100:
        return None
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        row = conn.execute(_LOOKUP, {"digest": _digest(session_id)}).first()
    if row is None:
        return None
    if row.tenant_id is not None:
        return Viewer(row.tenant_name, row.tenant_id, row.csrf_token, row.id_sha256)
    if row.operator_name is not None:
        return Viewer(row.operator_name, None, row.csrf_token, row.id_sha256)
    return None  # its key was revoked


def sign_out(engine: Engine, viewer: Viewer) -> None:
    with engine.begin() as conn:
        conn.execute(delete(sessions).where(sessions.c.id_sha256 == viewer.session_hash))
