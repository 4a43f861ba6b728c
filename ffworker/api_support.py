"""What every ``/v1`` blueprint shares: tenant authentication and keyset cursors.

One implementation, so that the jobs and the webhooks APIs answer a missing key and a forged
cursor the same way.
"""
from __future__ import annotations

import base64
import json
import uuid
from datetime import datetime

from flask import g, request
from flask_smorest import abort

from ffworker import tenants
from ffworker.extensions import services


def require_tenant() -> None:
    """A blueprint's ``before_request``: the bearer key's tenant in ``g.tenant``, else 401."""
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    tenant = None
    if scheme.lower() == "bearer" and key.strip():
        tenant = tenants.authenticate(services().engine, key.strip())
    if tenant is None:
        abort(401, message="a valid API key is required: Authorization: Bearer <key>")
    g.tenant = tenant


def encode_cursor(row: dict) -> str:
    """The opaque cursor after ``row`` in a newest-first listing: its (created_at, id)."""
    raw = json.dumps([row["created_at"].isoformat(), str(row["id"])]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """The (created_at, id) keyset position of a cursor this API returned; 422 for anything else."""
    try:
        created_at, row_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return datetime.fromisoformat(created_at), uuid.UUID(row_id)
    except (ValueError, TypeError, AttributeError):
        abort(422, message="invalid cursor", errors={"cursor": ["not a cursor this API returned"]})


def newest_first_page(args: dict, fetch) -> tuple[list, str | None]:
    """One page of a newest-first listing and the cursor of the next (None on the last page).

    ``args`` are the listing's query arguments: ``limit``, an optional ``cursor``, and filters
    handed on to ``fetch(limit=, before=, **filters)``, which is asked for one row more than
    the page holds: that row says whether a next page exists.
    """
    args = dict(args)
    limit = args.pop("limit")
    cursor = args.pop("cursor", None)
    rows = fetch(limit=limit + 1, before=decode_cursor(cursor) if cursor else None, **args)
    return rows[:limit], (encode_cursor(rows[limit - 1]) if len(rows) > limit else None)
