"""The ``/v1`` REST API: one MethodView per resource."""
from __future__ import annotations

import hashlib
import json
import uuid

from flask import Response, current_app, g, request, url_for
from flask.views import MethodView
from flask_smorest import Blueprint, abort

from ffworker import fetch, kinds, paths, sse as live, urlguard
from ffworker.dispatch import dispatch
from ffworker.errors import AlreadyTerminal, JobBusy, JobNotFound, NotRetryable
from ffworker.api_support import decode_cursor, encode_cursor, require_tenant
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
    errors = kind.check(paths.tenant_root(settings, g.tenant.name), spec, urls=fetch.UrlPolicy.from_settings(settings))
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
        limit = args.pop("limit")
        cursor = args.pop("cursor", None)
        rows = services().ledger.list(
            g.tenant.id, limit=limit + 1, before=decode_cursor(cursor) if cursor else None, **args
        )
        next_cursor = encode_cursor(rows[limit - 1]) if len(rows) > limit else None
        return {"jobs": [present(row) for row in rows[:limit]], "next_cursor": next_cursor}

    @blp.arguments(JobRequestSchema)
    @blp.response(202, JobSchema)
    @blp.alt_response(409, description="Idempotency-Key reused with a different body")
    @blp.alt_response(422, description="Invalid request, paths or kind rules")
    def post(self, body):
        """Submit a job. Returns at once; the job runs on a worker."""
        current = services()
        common, spec = split_request(body)
        _refuse_by_kind(common["kind"], spec)
        _refuse_webhook_url(common["webhook_url"])
        idempotency_key = request.headers.get("Idempotency-Key") or None
        if idempotency_key is not None and len(idempotency_key) > IDEMPOTENCY_KEY_MAX:
            abort(422, message=f"Idempotency-Key must be at most {IDEMPOTENCY_KEY_MAX} characters")
        settings = current.settings
        timeout_s = min(common["timeout_s"] or settings.job_timeout_s, settings.job_timeout_s)
        try:
            row, created = current.ledger.create(
                tenant_id=g.tenant.id, kind=common["kind"], spec=spec, workspace=common["workspace"],
                priority=common["priority"], metadata=common["metadata"], max_attempts=settings.max_attempts,
                timeout_s=timeout_s, idempotency_key=idempotency_key,
                request_sha256=_request_fingerprint(body) if idempotency_key else None,
                webhook_url=common["webhook_url"],
            )
        except IdempotencyConflict:
            abort(409, message="this Idempotency-Key was already used with a different request body")
        if created:
            dispatch(row["id"])
        location = url_for("jobs.Job", job_id=row["id"])
        return present(row), 202, {"Location": location}


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
            return present(row)
        state = _events()
        _take_slot(state)
        try:
            row = live.wait_for_end(state.hub, job_id, wait_s) or row
        finally:
            state.slots.release()
        return present(row)

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
            stream = live.open_stream(state, job_id, request.headers.get("Last-Event-ID"), _job_as_shown)
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


def _job_as_shown(row) -> dict:
    """The job exactly as ``GET /v1/jobs/{id}`` shows it."""
    return JobSchema().dump(present(row))


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
    return present(row)


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
        return present(row)
