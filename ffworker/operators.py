"""Operators: the people who run the service. An operator key signs in to the dashboard and
sees every tenant's jobs; it is not an API key (the REST API stays per tenant).

Keys are generated, shown once and stored as a SHA-256 hash exactly like tenants' API keys
(``ffworker.tenants``).
"""
from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine, bindparam, func, insert, select, update

from ffworker.models import Operator
from ffworker.tenants import NAME_PATTERN, PREFIX_CHARS, hash_key, new_key

operators = Operator.__table__


class OperatorError(ValueError):
    pass


@dataclass(frozen=True)
class AuthenticatedOperator:
    id: object
    name: str


def create_operator(engine: Engine, name: str) -> tuple[AuthenticatedOperator, str]:
    """A new operator and its key (the only time the key is seen)."""
    if not NAME_PATTERN.match(name):
        raise OperatorError("operator names are 1-63 characters of a-z, 0-9, '-' and '_', "
                            "starting with a letter or digit")
    key = new_key()
    with engine.begin() as conn:
        if conn.execute(select(operators.c.id).where(operators.c.name == name)).first():
            raise OperatorError(f"operator {name!r} already exists")
        operator_id = conn.execute(
            insert(operators).values(name=name, prefix=key[:PREFIX_CHARS], key_sha256=hash_key(key))
            .returning(operators.c.id)
        ).scalar_one()
    return AuthenticatedOperator(operator_id, name), key


def list_operators(engine: Engine) -> list[dict]:
    query = select(operators.c.name, operators.c.prefix, operators.c.created_at, operators.c.revoked_at) \
        .order_by(operators.c.name)
    with engine.connect() as conn:
        return [dict(row) for row in conn.execute(query).mappings()]


def revoke_operator(engine: Engine, name: str) -> int:
    """Revoke the operator's key (its dashboard sessions end with it); returns how many."""
    with engine.begin() as conn:
        return conn.execute(
            update(operators).where(operators.c.name == name, operators.c.revoked_at.is_(None))
            .values(revoked_at=func.now())
        ).rowcount


_AUTHENTICATE = select(operators.c.id, operators.c.name).where(
    operators.c.key_sha256 == bindparam("key_sha256"), operators.c.revoked_at.is_(None))


def authenticate(engine: Engine, key: str) -> AuthenticatedOperator | None:
    with engine.connect() as conn:
        row = conn.execute(_AUTHENTICATE, {"key_sha256": hash_key(key)}).first()
    return AuthenticatedOperator(row.id, row.name) if row else None
