"""The request body every kind shares: the common fields, and the field types kinds build on.

Pure validation: nothing here looks at the filesystem, the tenant or the
settings (the kind's submit-time check and the API do that).
"""
from __future__ import annotations

import json

from marshmallow import RAISE, Schema, ValidationError, fields, validate

METADATA_MAX_BYTES = 16 * 1024
COMMON_FIELDS = ("kind", "priority", "timeout_s", "workspace", "metadata", "webhook_url")
WEBHOOK_URL_MAX = 2048
WORKSPACE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]*\Z"  # \Z: "$" would also match before a final newline

RelativePath = lambda **kw: fields.String(validate=validate.Length(min=1, max=1024), **kw)  # noqa: E731


def even(value: int) -> None:
    if value % 2:
        raise ValidationError("must be even")


def _metadata_valid(value: dict) -> None:
    """JSON that PostgreSQL's jsonb can store, at most METADATA_MAX_BYTES of UTF-8."""
    try:
        encoded = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError:
        raise ValidationError("metadata must not contain NaN or Infinity")
    if "\\u0000" in encoded:
        raise ValidationError("metadata must not contain NUL characters")
    if len(encoded.encode()) > METADATA_MAX_BYTES:
        raise ValidationError(f"metadata must be at most {METADATA_MAX_BYTES} bytes as JSON")


class StrictSchema(Schema):
    class Meta:
        unknown = RAISE


class JobCommonSchema(StrictSchema):
    # Which kinds exist is checked where the kind's schema is picked (ffworker.schemas.JobRequestSchema).
    kind = fields.String(required=True)
    priority = fields.Integer(load_default=0, validate=validate.Range(-100, 100))
    timeout_s = fields.Integer(load_default=None, allow_none=True, validate=validate.Range(min=1))
    workspace = fields.String(
        load_default="default",
        validate=[validate.Length(min=1, max=64), validate.Regexp(WORKSPACE_PATTERN)],
    )
    metadata = fields.Dict(keys=fields.String(), load_default=dict, validate=_metadata_valid)
    overwrite = fields.Boolean(load_default=False)
    # Whether the URL may be connected to depends on the server's settings: the API asks
    # ffworker.urlguard, the one home of that rule, after this schema.
    webhook_url = fields.String(
        load_default=None, allow_none=True, validate=validate.Length(min=1, max=WEBHOOK_URL_MAX),
        metadata={"description": "an http(s) URL that receives this job's terminal event (a signed webhook)"},
    )
