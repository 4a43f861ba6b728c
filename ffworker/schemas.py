"""Request and response bodies, split by role: create (per kind), output, query args."""
from __future__ import annotations

import json
from typing import Mapping

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

from ffworker import concat, hls, kinds, rawcommand
from ffworker.config import get_settings
from ffworker.models import JOB_KINDS, JOB_STATUSES

METADATA_MAX_BYTES = 16 * 1024
COMMON_FIELDS = ("kind", "priority", "timeout_s", "workspace", "metadata", "webhook_url")
WORKSPACE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]*\Z"  # \Z: "$" would also match before a final newline

RelativePath = lambda **kw: fields.String(validate=validate.Length(min=1, max=1024), **kw)  # noqa: E731


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
    kind = fields.String(required=True, validate=validate.OneOf(JOB_KINDS))
    priority = fields.Integer(load_default=0, validate=validate.Range(-100, 100))
    timeout_s = fields.Integer(load_default=None, allow_none=True, validate=validate.Range(min=1))
    workspace = fields.String(
        load_default="default",
        validate=[validate.Length(min=1, max=64), validate.Regexp(WORKSPACE_PATTERN)],
    )
    metadata = fields.Dict(keys=fields.String(), load_default=dict, validate=_metadata_valid)
    overwrite = fields.Boolean(load_default=False)
    webhook_url = fields.String(load_default=None, allow_none=True, validate=lambda url: _webhook_url_valid(url))


class ProbeRequestSchema(JobCommonSchema):
    input = RelativePath(required=True)


def _even(height: int) -> None:
    if height % 2:
        raise ValidationError("must be even")


class VideoSchema(StrictSchema):
    codec = fields.String(load_default="h264", validate=validate.OneOf(kinds.VIDEO_CODECS))
    crf = fields.Integer(validate=validate.Range(0, 51))
    preset = fields.String(validate=validate.OneOf(kinds.X264_PRESETS))
    height = fields.Integer(validate=[validate.Range(16, 4320), _even])
    quality = fields.String(validate=validate.OneOf(kinds.QUALITY_HEIGHTS))
    fps = fields.Float(validate=validate.Range(min=1, max=240))

    @validates_schema
    def _one_size(self, data, **_):
        if "height" in data and "quality" in data:
            raise ValidationError("give height or quality, not both", "quality")


class AudioSchema(StrictSchema):
    codec = fields.String(load_default="aac", validate=validate.OneOf(kinds.AUDIO_CODECS))
    bitrate = fields.String(validate=validate.Regexp(r"^\d{1,3}k\Z", error="a bitrate like '128k'"))


class TranscodeRequestSchema(JobCommonSchema):
    input = RelativePath(required=True)
    output = RelativePath(required=True)
    preset = fields.String(validate=validate.OneOf(kinds.PRESETS))
    video = fields.Nested(VideoSchema)
    audio = fields.Nested(AudioSchema)
    container = fields.String(validate=validate.OneOf(kinds.CONTAINERS))

    @validates_schema
    def _rules(self, data, **_):
        if "output" not in data:
            return
        errors = kinds.transcode_rule_errors(data)
        if errors:
            raise ValidationError({field: [message] for field, message in errors.items()})


class ThumbnailRequestSchema(JobCommonSchema):
    input = RelativePath(required=True)
    output = RelativePath(required=True)
    at_s = fields.Float(validate=validate.Range(min=0))
    width = fields.Integer(validate=validate.Range(16, 7680))


def _request_media_root():
    """The calling tenant's media directory while an API request is handled, else None.

    Lets the hls and command schemas confine the paths that the API's
    field-based path checks cannot see (a directory, paths inside an argv).
    """
    from flask import g, has_request_context

    if not has_request_context() or getattr(g, "tenant", None) is None:
        return None
    from ffworker.extensions import services
    from ffworker.worker import tenant_root

    return tenant_root(services().settings, g.tenant.name)


def _webhook_url_valid(url: str | None) -> None:
    """A job's webhook_url: http(s), no guarded host named literally (ffworker.urlguard)."""
    from ffworker import urlguard

    try:
        urlguard.check_url_literal(url, allow_private=_current_settings().allow_private_urls)
    except urlguard.BlockedURL as exc:
        raise ValidationError(str(exc))


def _current_settings():
    from flask import has_app_context

    if has_app_context():
        from ffworker.extensions import services

        return services().settings
    return get_settings()


class ConcatRequestSchema(JobCommonSchema):
    inputs = fields.List(RelativePath(), required=True, validate=validate.Length(min=2, max=100))
    output = RelativePath(required=True)
    mode = fields.String(load_default="auto", validate=validate.OneOf(concat.MODES))
    # Re-encoding only: the size, frame rate and quality every input is normalised to
    # (default: the first input's size and frame rate).
    width = fields.Integer(validate=[validate.Range(16, 7680), _even])
    height = fields.Integer(validate=[validate.Range(16, 4320), _even])
    fps = fields.Float(validate=validate.Range(min=1, max=240))
    crf = fields.Integer(validate=validate.Range(0, 51))
    preset = fields.String(validate=validate.OneOf(kinds.X264_PRESETS))

    @validates_schema
    def _copy_takes_no_encoding(self, data, **_):
        if data.get("mode") == "copy":
            given = [name for name in ("width", "height", "fps", "crf", "preset") if name in data]
            if given:
                raise ValidationError({name: ["applies to re-encoding only, not to mode 'copy'"] for name in given})


class HlsRequestSchema(JobCommonSchema):
    input = RelativePath(required=True)
    output_dir = RelativePath(required=True)
    renditions = fields.List(
        fields.Integer(validate=[validate.Range(144, 4320), _even]),
        load_default=lambda: list(hls.DEFAULT_RENDITIONS), validate=validate.Length(min=1, max=8),
    )
    segment_s = fields.Float(load_default=hls.DEFAULT_SEGMENT_S, validate=validate.Range(min=1, max=60))

    @validates_schema
    def _output_dir(self, data, **_):
        if "%" in data["output_dir"]:
            raise ValidationError("must not contain '%' (ffmpeg's HLS muxer reads it as a pattern)", "output_dir")
        root = _request_media_root()
        errors = hls.path_errors(root, data) if root is not None else {}
        if errors:
            raise ValidationError(errors)


class CommandRequestSchema(JobCommonSchema):
    args = fields.List(
        fields.String(validate=validate.Length(max=rawcommand.MAX_ARG_CHARS)),
        required=True, validate=validate.Length(min=1, max=rawcommand.MAX_ARGS),
    )

    @validates_schema(skip_on_field_errors=False)
    def _enabled(self, data, **_):
        if not _current_settings().allow_raw_commands:
            raise ValidationError(rawcommand.DISABLED_MESSAGE, "kind")

    @validates_schema
    def _argv(self, data, **_):
        if not _current_settings().allow_raw_commands:
            return
        root = _request_media_root()
        if root is not None:
            errors = rawcommand.path_errors(root, data)
        else:
            try:
                rawcommand.parse(data["args"])
                errors = {}
            except rawcommand.CommandRefused as exc:
                errors = {"args": [exc.message]}
        if errors:
            raise ValidationError(errors)


KIND_SCHEMAS: dict[str, type[JobCommonSchema]] = {
    "probe": ProbeRequestSchema,
    "transcode": TranscodeRequestSchema,
    "thumbnail": ThumbnailRequestSchema,
    "concat": ConcatRequestSchema,
    "hls": HlsRequestSchema,
    "command": CommandRequestSchema,
}


# Built once: a schema instance holds no per-load state, and building one copies every field.
_KIND_SCHEMA_INSTANCES = {kind: schema() for kind, schema in KIND_SCHEMAS.items()}


class JobRequestSchema(Schema):
    """``POST /v1/jobs``: ``kind`` picks the schema the rest of the body must satisfy."""

    kind = fields.String(required=True, metadata={"enum": list(JOB_KINDS)})

    def load(self, data, *, many=None, partial=None, unknown=None):
        if not isinstance(data, Mapping):
            raise ValidationError({"_schema": ["the request body must be a JSON object"]})
        kind = data.get("kind")
        schema = _KIND_SCHEMA_INSTANCES.get(kind) if isinstance(kind, str) else None
        if schema is None:
            raise ValidationError({"kind": [f"must be one of: {', '.join(KIND_SCHEMAS)}"]})
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


class JobListSchema(Schema):
    jobs = fields.List(fields.Nested(JobSchema))
    next_cursor = fields.String(allow_none=True)


class JobListArgsSchema(StrictSchema):
    status = fields.String(validate=validate.OneOf(JOB_STATUSES))
    kind = fields.String(validate=validate.OneOf(JOB_KINDS))
    workspace = fields.String(validate=[validate.Length(min=1, max=64), validate.Regexp(WORKSPACE_PATTERN)])
    created_after = fields.AwareDateTime(default_timezone=None)
    created_before = fields.AwareDateTime(default_timezone=None)
    limit = fields.Integer(load_default=50, validate=validate.Range(1, 200))
    cursor = fields.String(validate=validate.Length(max=200))


def present(row: Mapping) -> dict:
    """The API's view of a ledger row (never the stderr tail or the worker's host)."""
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
        "result": row["result"] if row["status"] == "completed" else None,
        "error": error,
        "metadata": row["metadata"],
    }


# -- query args of GET /v1/jobs/{id} ------------------------------------------

LONG_POLL_MAX_S = 60


class JobGetArgsSchema(StrictSchema):
    wait = fields.Float(
        validate=validate.Range(0, LONG_POLL_MAX_S),
        metadata={"description": f"Long-poll: answer once the job is terminal, or after this many seconds "
                                 f"(at most {LONG_POLL_MAX_S})"},
    )
