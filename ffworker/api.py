"""The ``/v1`` REST API: one MethodView per resource."""
from __future__ import annotations

import functools
import hashlib
import json
import uuid

from flask import Response, current_app, g, request, url_for
from flask.views import MethodView
from flask_smorest import Blueprint, abort
from marshmallow import Schema, ValidationError, fields
from werkzeug.exceptions import HTTPException

from ffworker import fetch, kinds, s3, sse as live, storage, urlguard
from ffworker.config import KIND_SLOTS
from ffworker.dispatch import dispatch, dispatch_many
from ffworker.errors import AlreadyTerminal, JobBusy, JobNotFound, NotRetryable
from ffworker.api_support import newest_first_page, require_tenant
from ffworker.extensions import services
from ffworker.ledger import IdempotencyConflict
from ffworker.models import TERMINAL_STATUSES
from ffworker.schemas import (
    JobGetArgsSchema,
    JobListArgsSchema,
    JobListSchema,
    JobRequestSchema,
    JobSchema,
    present,
    split_request,
)

blp = Blueprint("jobs", __name__, url_prefix="/v1/jobs", description="Media jobs")
blp.before_request(require_tenant)
IDEMPOTENCY_KEY_MAX = 200




def _job_or_404(job_id: uuid.UUID) -> dict:
    row = services().ledger.get(job_id, tenant_id=g.tenant.id)
    if row is None:
        abort(404, message="job not found")
    return row


def _refuse_by_kind(kind_name: str, spec: dict) -> None:
    """The kind's submit-time rules, run once here: enabled on this server, then its paths confined.

    Messages mention only the caller's own paths.
    """
    kind = kinds.get(kind_name)
    refusal = kind.unavailable(services().settings)
    if refusal:
        abort(422, errors={"kind": [refusal]})
    settings = services().settings
    errors = kind.check(storage.for_tenant(settings, g.tenant.name), spec, urls=fetch.UrlPolicy.from_settings(settings))
    if errors:
        abort(422, errors=errors)


def _refuse_webhook_url(url: str | None) -> None:
    """A job's ``webhook_url`` must be one ffworker may connect to (checked again at every attempt)."""
    if url is None:
        return
    try:
        urlguard.check_url_literal(url, allow_private=services().settings.allow_private_urls)
    except urlguard.BlockedURL as exc:
        abort(422, errors={"webhook_url": [str(exc)]})


def _request_fingerprint(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


@blp.route("")
class Jobs(MethodView):
    @blp.arguments(JobListArgsSchema, location="query")
    @blp.response(200, JobListSchema)
    def get(self, args):
        """List the tenant's jobs, newest first."""
        rows, next_cursor = newest_first_page(args, functools.partial(services().ledger.list, g.tenant.id))
        output_url = _output_urls()
        return {"jobs": [present(row, output_url) for row in rows], "next_cursor": next_cursor}

    @blp.arguments(JobRequestSchema)
    @blp.response(202, JobSchema)
    @blp.alt_response(409, description="Idempotency-Key reused with a different body")
    @blp.alt_response(422, description="Invalid request, paths or kind rules")
    def post(self, body):
        """Submit a job. Returns at once; the job runs on a worker."""
        current = services()
        values = _job_values(body)
        idempotency_key = _idempotency_key()
        try:
            row, created = current.ledger.create(
                tenant_id=g.tenant.id, **values, idempotency_key=idempotency_key,
                request_sha256=_request_fingerprint(body) if idempotency_key else None,
            )
        except IdempotencyConflict:
            abort(409, message="this Idempotency-Key was already used with a different request body")
        if created:
            dispatch(row["id"], submitted=True)
        location = url_for("jobs.Job", job_id=row["id"])
        return _with_waiting([row])[0], 202, {"Location": location}


def _idempotency_key() -> str | None:
    idempotency_key = request.headers.get("Idempotency-Key") or None
    if idempotency_key is not None and len(idempotency_key) > IDEMPOTENCY_KEY_MAX:
        abort(422, message=f"Idempotency-Key must be at most {IDEMPOTENCY_KEY_MAX} characters")
    return idempotency_key


def _job_values(body: dict) -> dict:
    """The ledger's columns of a validated job body, after the kind's and the webhook URL's checks."""
    settings = services().settings
    common, spec = split_request(body)
    _refuse_by_kind(common["kind"], spec)
    _refuse_webhook_url(common["webhook_url"])
    return dict(
        kind=common["kind"], spec=spec, workspace=common["workspace"], priority=common["priority"],
        metadata=common["metadata"], max_attempts=settings.max_attempts,
        timeout_s=min(common["timeout_s"] or settings.job_timeout_s, settings.job_timeout_s),
        webhook_url=common["webhook_url"], slots=KIND_SLOTS[common["kind"]],
    )


def _with_waiting(rows: list) -> list[dict]:
    """The jobs as the API shows them, with ``waiting`` for those a write left queued."""
    queued = [row["id"] for row in rows if row["status"] == "queued" and "waiting" not in row]
    reasons = services().ledger.why_waiting(queued)
    output_url = _output_urls()
    return [present({**row, "waiting": reasons.get(row["id"], row.get("waiting"))}, output_url) for row in rows]


BATCH_MAX = 1000


class BatchResponseSchema(Schema):
    jobs = fields.List(fields.Nested(JobSchema))


@blp.route("/batch")
class JobBatch(MethodView):
    @blp.doc(requestBody={"required": True, "content": {"application/json": {"schema": {
        "type": "object", "required": ["jobs"],
        "properties": {"jobs": {"type": "array", "maxItems": BATCH_MAX,
                                "items": {"$ref": "#/components/schemas/JobRequest"}}}}}}})
    @blp.response(202, BatchResponseSchema)
    @blp.alt_response(409, description="Idempotency-Key reused with a different batch")
    @blp.alt_response(422, description="A body is invalid (errors name its index and field), or more than 1,000 jobs")
    def post(self):
        """Submit up to 1,000 jobs at once, all or none: each validated as ``POST /v1/jobs`` would,
        inserted in one statement; the jobs come back in request order."""
        payload = request.get_json(silent=True)
        if not isinstance(payload, dict) or not isinstance(payload.get("jobs"), list) or set(payload) != {"jobs"}:
            abort(422, message='the body must be {"jobs": [<job>, …]}', errors={"jobs": ["a list of job bodies"]})
        bodies = payload["jobs"]
        if not 1 <= len(bodies) <= BATCH_MAX:
            abort(422, message=f"a batch holds 1 to {BATCH_MAX} jobs", errors={"jobs": [f"1 to {BATCH_MAX} jobs"]})
        schema = JobRequestSchema()
        values, errors = [], {}
        for index, body in enumerate(bodies):
            try:
                values.append(_job_values(schema.load(body)))
            except ValidationError as exc:
                errors[str(index)] = exc.normalized_messages()
            except HTTPException as exc:  # the kind's path checks, the webhook URL
                errors[str(index)] = getattr(exc, "data", {}).get("errors") or {"_schema": [str(exc)]}
        if errors:
            abort(422, message=f"{len(errors)} of {len(bodies)} jobs are invalid; none was submitted",
                  errors={"jobs": errors})
        idempotency_key = _idempotency_key()
        current = services()
        try:
            rows, created = current.ledger.create_many(
                tenant_id=g.tenant.id, jobs_values=values, idempotency_key=idempotency_key,
                request_sha256=_request_fingerprint(payload) if idempotency_key else None,
            )
        except IdempotencyConflict:
            abort(409, message="this Idempotency-Key was already used with a different request body")
        if created:
            dispatch_many([row["id"] for row in rows], messages=current.ledger.slots_of(g.tenant.id))
        return {"jobs": _with_waiting(rows)}, 202


@blp.route("/<uuid:job_id>")
class Job(MethodView):
    @blp.arguments(JobGetArgsSchema, location="query")
    @blp.response(200, JobSchema)
    @blp.alt_response(503, description="Too many long-polls and event streams open on this process; "
                                       "retry after Retry-After seconds")
    def get(self, args, job_id):
        """One job. With ``wait=S`` (≤ 60): answer once the job is terminal, or after S seconds."""
        row = _job_or_404(job_id)
        wait_s = args.get("wait")
        if not wait_s or row["status"] in TERMINAL_STATUSES:
            return present(row, _output_urls())
        state = _events()
        _take_slot(state)
        try:
            row = live.wait_for_end(state.hub, job_id, wait_s) or row
        finally:
            state.slots.release()
        return present(row, _output_urls())

    @blp.response(202, JobSchema)
    @blp.alt_response(409, description="The job already ended")
    @blp.alt_response(503, description="The job's row is held by a stalled session; retry after Retry-After seconds")
    def delete(self, job_id):
        """Cancel the job (same as ``POST /v1/jobs/{id}/cancel``)."""
        return _cancel(job_id)


@blp.route("/<uuid:job_id>/cancel")
class JobCancel(MethodView):
    @blp.response(202, JobSchema)
    @blp.alt_response(409, description="The job already ended")
    @blp.alt_response(503, description="The job's row is held by a stalled session; retry after Retry-After seconds")
    def post(self, job_id):
        """Cancel: a queued job ends at once, a running one within about a second."""
        return _cancel(job_id)


@blp.route("/<uuid:job_id>/events")
class JobEvents(MethodView):
    @blp.doc(
        parameters=[{
            "in": "header", "name": "Last-Event-ID", "required": False, "schema": {"type": "string"},
            "description": "The id of the last event received: resume after it, without replay",
        }],
        responses={
            "200": {
                "description": "Server-Sent Events: `status` (one per transition, from the first) and "
                               "`progress` (the latest progress snapshot after each progress write); every "
                               "event has an `id:` to resume from; the stream ends after the terminal status. "
                               "A comment line is sent when nothing else was for FFWORKER_SSE_KEEPALIVE_S.",
                "content": {"text/event-stream": {"schema": {
                    "type": "object", "required": ["id", "event", "data"],
                    "properties": {
                        "id": {"type": "string", "description": "resume from here with Last-Event-ID"},
                        "event": {"type": "string", "enum": ["status", "progress"]},
                        "data": {"type": "string", "description": "a JSON object: the transition, or the "
                                                                  "job's progress snapshot"},
                    },
                }}},
            },
            "204": {"description": "Resumed after the job's terminal status: nothing more will come"},
            "503": {"description": "Too many streams open on this process; retry after Retry-After seconds"},
        },
    )
    def get(self, job_id):
        """Live status and progress of a job as Server-Sent Events."""
        _job_or_404(job_id)
        state = _events()
        _take_slot(state)
        try:
            # The stream is read after this view returned, outside its request: the tenant's
            # URL maker goes with it.
            shown = functools.partial(_job_as_shown, output_url=_output_urls())
            stream = live.open_stream(state, job_id, request.headers.get("Last-Event-ID"), shown)
        except BaseException:
            state.slots.release()
            raise
        if stream.job is None:  # pruned just now
            stream.close()
            abort(404, message="job not found")
        if stream.exhausted:
            stream.close()  # resumed after the terminal status: EventSource clients stop on 204
            return Response(status=204)
        response = Response(stream, mimetype="text/event-stream")
        response.headers["Cache-Control"] = "no-cache, no-store"
        response.headers["X-Accel-Buffering"] = "no"  # nginx: do not buffer the stream
        return response


def _job_as_shown(row, output_url=None) -> dict:
    """The job exactly as ``GET /v1/jobs/{id}`` shows it."""
    return JobSchema().dump(present(row, output_url))


def _output_urls():
    """With object storage, the calling tenant's download URLs (``schemas.present``); else None."""
    return s3.output_urls(services().settings, g.tenant.name)


def _events() -> live.Events:
    return current_app.extensions["ffworker_events"]


def _take_slot(state: live.Events) -> None:
    if not state.slots.try_acquire():
        abort(503, message="too many open event streams and long-polls on this server process; retry shortly",
              headers={"Retry-After": str(state.limits.retry_after_s)})


def _cancel(job_id):
    try:
        row = services().ledger.request_cancel(job_id, g.tenant.id)
    except JobNotFound:
        abort(404, message="job not found")
    except AlreadyTerminal as exc:
        abort(409, message=str(exc))
    except JobBusy as exc:
        abort(503, message=str(exc), headers={"Retry-After": "1"})
    return present(row, _output_urls())


# -- retry ----------------------------------------------------------------------


@blp.route("/<uuid:job_id>/retry")
class JobRetry(MethodView):
    @blp.response(202, JobSchema)
    @blp.alt_response(409, description="Only a failed or cancelled job can be retried")
    def post(self, job_id):
        """Run a failed or cancelled job again: it goes back to ``queued`` with a fresh allowance of
        ``FFWORKER_MAX_ATTEMPTS`` runs (``attempts`` keeps counting; ``max_attempts`` grows)."""
        current = services()
        try:
            row = current.ledger.retry(job_id, g.tenant.id, current.settings.max_attempts)
        except JobNotFound:
            abort(404, message="job not found")
        except NotRetryable as exc:
            abort(409, message=str(exc))
        dispatch(row["id"])
        return _with_waiting([row])[0]


# -- limits ---------------------------------------------------------------------

limits_blp = Blueprint("limits", __name__, url_prefix="/v1/limits", description="Fair-share limits")
limits_blp.before_request(require_tenant)


class SlotsSchema(Schema):
    limit = fields.Integer()
    default = fields.Boolean(metadata={"description": "true: FFWORKER_TENANT_MAX_SLOTS, not a limit of its own"})
    used = fields.Integer()


class RateSchema(Schema):
    limit = fields.Integer(allow_none=True, metadata={"description": "jobs started per sliding 60 s; null: none"})
    started_last_60s = fields.Integer(allow_none=True)


class FleetSchema(Schema):
    max_running = fields.Integer(allow_none=True, metadata={"description": "FFWORKER_MAX_RUNNING; null: none"})
    running_jobs = fields.Integer()


class LimitsSchema(Schema):
    slots = fields.Nested(SlotsSchema)
    rate_per_min = fields.Nested(RateSchema)
    running_jobs = fields.Integer()
    queued_jobs = fields.Integer()
    fleet = fields.Nested(FleetSchema)
    kind_slots = fields.Dict(keys=fields.String(), values=fields.Integer())


@limits_blp.route("")
class Limits(MethodView):
    @limits_blp.response(200, LimitsSchema)
    def get(self):
        """The calling tenant's limits and current use, the fleet's limit, and what each kind costs."""
        return {**services().ledger.limits(g.tenant.id), "kind_slots": KIND_SLOTS}
