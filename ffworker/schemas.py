"""Request and response bodies, split by role: create (per kind), output, query args.

Pure validation: each kind's request schema comes from the kinds registry
(``ffworker.kinds``); path confinement happens in the API, through the kind.
"""
from __future__ import annotations

from typing import Callable, Mapping

from marshmallow import Schema, ValidationError, fields, validate

from ffworker import kinds
from ffworker.kinds.request import COMMON_FIELDS, WORKSPACE_PATTERN, StrictSchema
from ffworker.models import JOB_STATUSES

# Built once: a schema instance holds no per-load state, and building one copies every field.
_KIND_SCHEMA_INSTANCES = {name: kind.schema() for name, kind in kinds.KINDS.items()}


class JobRequestSchema(Schema):
    """``POST /v1/jobs``: ``kind`` picks the schema the rest of the body must satisfy."""

    kind = fields.String(required=True, metadata={"enum": list(kinds.names())})

    def load(self, data, *, many=None, partial=None, unknown=None):
        if not isinstance(data, Mapping):
            raise ValidationError({"_schema": ["the request body must be a JSON object"]})
        kind = data.get("kind")
        schema = _KIND_SCHEMA_INSTANCES.get(kind) if isinstance(kind, str) else None
        if schema is None:
            raise ValidationError({"kind": [f"must be one of: {', '.join(kinds.names())}"]})
        return schema.load(data)


def split_request(request: dict) -> tuple[dict, dict]:
    """(common fields, the kind-specific spec stored on the job)."""
    common = {k: request[k] for k in COMMON_FIELDS}
    spec = {k: v for k, v in request.items() if k not in COMMON_FIELDS}
    return common, spec


# -- responses -------------------------------------------------------------


class ProgressSchema(Schema):
    percent = fields.Float(allow_none=True)
    frame = fields.Integer(allow_none=True)
    fps = fields.Float(allow_none=True)
    speed = fields.Float(allow_none=True)
    out_time_s = fields.Float(allow_none=True)
    eta_s = fields.Float(allow_none=True)


class JobErrorSchema(Schema):
    code = fields.String()
    message = fields.String()


class JobSchema(Schema):
    id = fields.UUID()
    kind = fields.String()
    status = fields.String(metadata={"enum": list(JOB_STATUSES)})
    workspace = fields.String()
    priority = fields.Integer()
    spec = fields.Dict()
    progress = fields.Nested(ProgressSchema, allow_none=True)
    attempts = fields.Integer()
    max_attempts = fields.Integer()
    timeout_s = fields.Integer()
    created_at = fields.DateTime()
    started_at = fields.DateTime(allow_none=True)
    finished_at = fields.DateTime(allow_none=True)
    updated_at = fields.DateTime()
    cancel_requested_at = fields.DateTime(allow_none=True)
    result = fields.Dict(allow_none=True)
    error = fields.Nested(JobErrorSchema, allow_none=True)
    metadata = fields.Dict()
    webhook_url = fields.String(allow_none=True)
    slots = fields.Integer(metadata={"description": "What the job costs its tenant's running slots"})
    waiting = fields.String(allow_none=True, metadata={
        "enum": ["backoff", "tenant_limit", "rate_limit", "global_limit", "workers_busy"],
        "description": "Why a queued job has not started (null unless queued)"})


class JobListSchema(Schema):
    jobs = fields.List(fields.Nested(JobSchema))
    next_cursor = fields.String(allow_none=True)


class JobListArgsSchema(StrictSchema):
    status = fields.String(validate=validate.OneOf(JOB_STATUSES))
    kind = fields.String(validate=validate.OneOf(kinds.names()))
    workspace = fields.String(validate=[validate.Length(min=1, max=64), validate.Regexp(WORKSPACE_PATTERN)])
    created_after = fields.AwareDateTime(default_timezone=None)
    created_before = fields.AwareDateTime(default_timezone=None)
    limit = fields.Integer(load_default=50, validate=validate.Range(1, 200))
    cursor = fields.String(validate=validate.Length(max=200))


def present(row: Mapping, output_url: Callable[[str], str] | None = None) -> dict:
    """The API's view of a ledger row (never the stderr tail or the worker's host).

    ``output_url``: with object storage, a tenant file's download URL by its path
    (``s3.output_urls``); each output of a completed job then shows one, made now, since a
    URL stored with the result would expire while the row lives on.
    """
    progress = None
    if row.get("progress_at") is not None:
        progress = {key: row[f"progress_{key}"] for key in ProgressSchema._declared_fields}
    error = None
    if row["status"] in ("failed", "cancelled") and row.get("error_code"):
        error = {"code": row["error_code"], "message": row.get("error_message") or ""}
    return {
        **{key: row[key] for key in (
            "id", "kind", "status", "workspace", "priority", "spec", "attempts", "max_attempts",
            "timeout_s", "created_at", "started_at", "finished_at", "updated_at", "cancel_requested_at",
        )},
        "progress": progress,
        "result": with_urls(row["result"], output_url) if row["status"] == "completed" else None,
        "error": error,
        "metadata": row["metadata"],
        "webhook_url": row.get("webhook_url"),
        "slots": row.get("slots", 1),
        "waiting": row.get("waiting") if row["status"] == "queued" else None,
    }


def with_urls(result: Mapping | None, output_url: Callable[[str], str] | None) -> Mapping | None:
    """``result`` with a ``url`` on each of its outputs (the stored result is left as it is)."""
    if output_url is None or not isinstance(result, Mapping) or not isinstance(result.get("outputs"), list):
        return result
    shown = [{**entry, "url": output_url(entry["path"])} if isinstance(entry, Mapping) and "path" in entry else entry
             for entry in result["outputs"]]
    return {**result, "outputs": shown}


# -- query args of GET /v1/jobs/{id} ------------------------------------------

LONG_POLL_MAX_S = 60


class JobGetArgsSchema(StrictSchema):
    wait = fields.Float(
        validate=validate.Range(0, LONG_POLL_MAX_S),
        metadata={"description": f"Long-poll: answer once the job is terminal, or after this many seconds "
                                 f"(at most {LONG_POLL_MAX_S})"},
    )
