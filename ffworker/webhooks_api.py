"""The ``/v1/webhooks`` REST API: endpoints, the signing secret, the delivery log and replay."""
from __future__ import annotations

from functools import partial

from flask import current_app, g
from flask.views import MethodView
from flask_smorest import Blueprint, abort
from marshmallow import Schema, fields, validate

from ffworker import urlguard, webhooks
from ffworker.api_support import newest_first_page, require_tenant
from ffworker.delivery import DELIVER_TASK, webhooks_queue
from ffworker.extensions import services
from ffworker.models import DELIVERY_STATUSES, WEBHOOK_EVENTS
from ffworker.kinds.request import WORKSPACE_PATTERN, StrictSchema

blp = Blueprint("webhooks", __name__, url_prefix="/v1/webhooks",
                description="Webhooks: where job events are sent, signed the Standard Webhooks way")
blp.before_request(require_tenant)




# -- schemas ------------------------------------------------------------------------

Events = lambda **kw: fields.List(  # noqa: E731
    fields.String(validate=validate.OneOf(WEBHOOK_EVENTS)), validate=validate.Length(min=1, max=len(WEBHOOK_EVENTS)),
    **kw)
Workspace = lambda **kw: fields.String(  # noqa: E731
    allow_none=True, validate=[validate.Length(min=1, max=64), validate.Regexp(WORKSPACE_PATTERN)], **kw)


class EndpointCreateSchema(StrictSchema):
    url = fields.String(required=True, validate=validate.Length(min=1, max=2048))
    events = Events(required=True)
    workspace = Workspace(load_default=None, metadata={"description": "only jobs of this workspace (default: all)"})
    description = fields.String(load_default="", validate=validate.Length(max=500))


class EndpointUpdateSchema(StrictSchema):
    url = fields.String(validate=validate.Length(min=1, max=2048))
    events = Events()
    workspace = Workspace()
    description = fields.String(validate=validate.Length(max=500))
    enabled = fields.Boolean()


class EndpointSchema(Schema):
    id = fields.UUID()
    url = fields.String()
    events = fields.List(fields.String())
    workspace = fields.String(allow_none=True)
    description = fields.String()
    enabled = fields.Boolean()
    created_at = fields.DateTime()
    updated_at = fields.DateTime()
    failing_since = fields.DateTime(allow_none=True)
    disabled_reason = fields.String(allow_none=True)


class EndpointListSchema(Schema):
    endpoints = fields.List(fields.Nested(EndpointSchema))


class SecretSchema(Schema):
    secret = fields.String(metadata={"description": "whsec_… (base64 of the HMAC key after the prefix)"})
    previous_expires_at = fields.DateTime(allow_none=True, metadata={
        "description": "until when the previous secret also signs (a second v1 signature)"})


class AttemptSchema(Schema):
    attempt = fields.Integer()
    scheduled = fields.Boolean(metadata={"description": "false for a retry requested through the API"})
    at = fields.DateTime(attribute="started_at")
    finished_at = fields.DateTime(allow_none=True)
    status_code = fields.Integer(allow_none=True)
    latency_ms = fields.Float(allow_none=True)
    error_class = fields.String(allow_none=True)
    response = fields.String(attribute="response_excerpt", allow_none=True,
                             metadata={"description": "the first 1 KiB of the response body"})


class DeliverySchema(Schema):
    id = fields.UUID()
    job_id = fields.UUID()
    endpoint_id = fields.UUID(allow_none=True, metadata={"description": "null for the job's own webhook_url"})
    url = fields.String(allow_none=True)
    event = fields.String(metadata={"enum": list(WEBHOOK_EVENTS)})
    webhook_id = fields.String()
    status = fields.String(metadata={"enum": list(DELIVERY_STATUSES)})
    event_at = fields.DateTime()
    created_at = fields.DateTime()
    next_attempt_at = fields.DateTime(allow_none=True)
    retry_requested_at = fields.DateTime(allow_none=True)
    finished_at = fields.DateTime(allow_none=True)
    attempts = fields.List(fields.Nested(AttemptSchema))


class DeliveryListSchema(Schema):
    deliveries = fields.List(fields.Nested(DeliverySchema))
    next_cursor = fields.String(allow_none=True)


class DeliveryListArgsSchema(StrictSchema):
    job_id = fields.UUID()
    endpoint_id = fields.UUID()
    status = fields.String(validate=validate.OneOf(DELIVERY_STATUSES))
    limit = fields.Integer(load_default=50, validate=validate.Range(1, 200))
    cursor = fields.String(validate=validate.Length(max=200))


# -- helpers ------------------------------------------------------------------------------


def _checked_url(url: str) -> str:
    try:
        return urlguard.check_url_literal(url, allow_private=services().settings.allow_private_urls)
    except urlguard.BlockedURL as exc:
        abort(422, message=f"invalid request: url: {exc}", errors={"url": [str(exc)]})


def _publish(delivery_id) -> None:
    """Send the delivery's message now; if the broker is away, the relay sends it later."""
    try:
        current_app.extensions["celery"].send_task(DELIVER_TASK, args=[str(delivery_id)],
                                                   queue=webhooks_queue(services().settings))
    except Exception:  # noqa: BLE001 - the beat relay publishes it again
        pass


# -- endpoints ------------------------------------------------------------------------------


@blp.route("")
class Endpoints(MethodView):
    @blp.response(200, EndpointListSchema)
    def get(self):
        """The tenant's webhook endpoints."""
        return {"endpoints": webhooks.list_endpoints(services().engine, g.tenant.id)}

    @blp.arguments(EndpointCreateSchema)
    @blp.response(201, EndpointSchema)
    @blp.alt_response(422, description="Invalid request, or a URL the SSRF guard refuses")
    def post(self, body):
        """Register an endpoint for some of: job.started, job.completed, job.failed, job.cancelled."""
        _checked_url(body["url"])
        return webhooks.create_endpoint(services().engine, g.tenant.id, **body)


@blp.route("/<uuid:endpoint_id>")
class Endpoint(MethodView):
    @blp.response(200, EndpointSchema)
    def get(self, endpoint_id):
        """One endpoint."""
        try:
            return webhooks.get_endpoint(services().engine, g.tenant.id, endpoint_id)
        except webhooks.NotFound:
            abort(404, message="endpoint not found")

    @blp.arguments(EndpointUpdateSchema)
    @blp.response(200, EndpointSchema)
    def patch(self, body, endpoint_id):
        """Change an endpoint (e.g. ``{"enabled": false}``). Disabling it fails its pending deliveries."""
        if "url" in body:
            _checked_url(body["url"])
        try:
            return webhooks.update_endpoint(services().engine, g.tenant.id, endpoint_id, body)
        except webhooks.NotFound:
            abort(404, message="endpoint not found")

    @blp.response(204)
    def delete(self, endpoint_id):
        """Delete an endpoint, with its deliveries."""
        try:
            webhooks.delete_endpoint(services().engine, g.tenant.id, endpoint_id)
        except webhooks.NotFound:
            abort(404, message="endpoint not found")


# -- the signing secret ------------------------------------------------------------------------


@blp.route("/secret")
class Secret(MethodView):
    @blp.response(200, SecretSchema)
    def get(self):
        """The tenant's current signing secret (created on first use)."""
        return {"secret": webhooks.current_secret(services().engine, g.tenant.id), "previous_expires_at": None}


@blp.route("/secret/rotate")
class SecretRotate(MethodView):
    @blp.response(200, SecretSchema)
    def post(self):
        """A new signing secret; the previous one keeps signing (a second signature) for 24 h."""
        return webhooks.rotate_secret(services().engine, g.tenant.id)


# -- deliveries --------------------------------------------------------------------------------


@blp.route("/deliveries")
class Deliveries(MethodView):
    @blp.arguments(DeliveryListArgsSchema, location="query")
    @blp.response(200, DeliveryListSchema)
    def get(self, args):
        """The delivery log, newest first, with every attempt."""
        rows, next_cursor = newest_first_page(
            args, partial(webhooks.list_deliveries, services().engine, g.tenant.id))
        return {"deliveries": rows, "next_cursor": next_cursor}


@blp.route("/deliveries/<uuid:delivery_id>")
class Delivery(MethodView):
    @blp.response(200, DeliverySchema)
    def get(self, delivery_id):
        """One delivery and its attempts."""
        try:
            return webhooks.get_delivery(services().engine, g.tenant.id, delivery_id)
        except webhooks.NotFound:
            abort(404, message="delivery not found")


@blp.route("/deliveries/<uuid:delivery_id>/retry")
class DeliveryRetry(MethodView):
    @blp.response(202, DeliverySchema)
    @blp.alt_response(409, description="The delivery's endpoint is disabled")
    def post(self, delivery_id):
        """Send the delivery again now, as the same delivery (same webhook-id): one more attempt."""
        try:
            row = webhooks.request_retry(services().engine, g.tenant.id, delivery_id)
        except webhooks.NotFound:
            abort(404, message="delivery not found")
        except webhooks.Conflict as exc:
            abort(409, message=str(exc))
        _publish(delivery_id)
        return row

