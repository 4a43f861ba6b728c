"""The Flask application factory."""
from __future__ import annotations

import logging
from typing import Any, Mapping

from flask import Flask, Response, jsonify
from apispec import BasePlugin
from flask_smorest import Api
from sqlalchemy import text
from werkzeug.exceptions import HTTPException, InternalServerError, ServiceUnavailable

from ffworker import __version__, logs, storage  # noqa: F401  (logs: worker lines name their job)
from ffworker.celery_wiring import celery_init_app
from ffworker.config import Settings
from ffworker.extensions import init_app, services

log = logging.getLogger("ffworker.app")
MAX_BODY_BYTES = 1024 * 1024


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app. ``config`` may hold Flask settings and ``FFWORKER_SETTINGS`` (a Settings;
    default: the environment's, which raises ConfigError when a variable is invalid)."""
    app = Flask("ffworker")
    app.config.update(
        API_TITLE="ffworker",
        API_VERSION=__version__,
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        MAX_CONTENT_LENGTH=MAX_BODY_BYTES,
        JSON_SORT_KEYS=False,
    )
    if config:
        app.config.update(config)
    settings: Settings = app.config.get("FFWORKER_SETTINGS") or Settings.from_env()
    init_app(app, settings)
    celery_init_app(app)

    api = Api(app)
    api.spec.components.security_scheme("bearerAuth", {"type": "http", "scheme": "bearer"})
    api.spec.options["security"] = [{"bearerAuth": []}]
    _document_server_limits(api)
    from ffworker.api import blp, limits_blp
    from ffworker.files_api import blp as files_blp
    from ffworker.webhooks_api import blp as webhooks_blp

    api.register_blueprint(blp)
    api.register_blueprint(limits_blp)
    api.register_blueprint(webhooks_blp)
    api.register_blueprint(files_blp)
    _register_events(app, settings)
    _register_probes(app)
    _register_metrics(app, settings)
    _register_error_handlers(app)
    from ffworker import ui  # the dashboard at /ui/

    ui.init_app(app)
    return app


class _ServerLimits(BasePlugin):
    """Answers the HTTP server gives before the app sees a request, on every operation: gunicorn
    refuses a request line longer than its ``limit_request_line`` (4094 bytes) with a 414 page of
    its own (HTML, not the app's JSON error body)."""

    def operation_helper(self, path=None, operations=None, **kwargs):
        for operation in (operations or {}).values():
            operation.setdefault("responses", {}).setdefault("414", {
                "description": "URI too long: the request line is over the web server's limit (4094 bytes)",
                "content": {"text/html": {"schema": {"type": "string"}}},
            })


def _document_server_limits(api: Api) -> None:
    plugin = _ServerLimits()
    plugin.init_spec(api.spec)
    api.spec.plugins.append(plugin)


def _register_probes(app: Flask) -> None:
    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/ready")
    def ready():
        down = [name for name, check in (("database", _database_up), ("broker", _broker_up)) if not check()]
        if down:
            return {"status": "unavailable", "message": f"unreachable: {', '.join(down)}", "down": down}, 503
        return {"status": "ok"}


def _register_events(app: Flask, settings: Settings) -> None:
    """One notification hub per app (so per web process); it listens from the first stream on."""
    from ffworker.listener import NotificationHub, listen_dsn
    from ffworker.sse import Events

    ledger = app.extensions["ffworker"].ledger
    hub = NotificationHub(listen_dsn(settings.database_url), ledger.job_with_events)
    app.extensions["ffworker_events"] = Events(hub, settings)


def _register_metrics(app: Flask, settings: Settings) -> None:
    from flask import request

    from ffworker.metrics import Metrics

    metrics = Metrics(app.extensions["ffworker"].engine, settings.stale_after_s,
                      tenant_max_slots=settings.tenant_max_slots, max_running=settings.max_running)
    app.extensions["ffworker_metrics"] = metrics

    @app.get("/metrics")
    def prometheus_metrics():
        body, content_type = metrics.render(request.headers.get("Accept"))
        return Response(body, content_type=content_type)


def _database_up() -> bool:
    try:
        with services().engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except Exception:
        return False


def _broker_up() -> bool:
    from flask import current_app

    try:
        with current_app.extensions["celery"].connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return True
    except Exception:
        return False


def _register_error_handlers(app: Flask) -> None:
    """Every error is JSON with a ``message``; never a traceback, a path or SQL text."""

    @app.errorhandler(HTTPException)
    def http_error(err: HTTPException):
        data = getattr(err, "data", None) or {}
        body: dict[str, Any] = {"code": err.code, "status": err.name}
        errors = data.get("errors")
        messages = data.get("messages")
        if messages is not None:  # webargs: {location: {field: [...]}} or {location: [...]}
            errors = {}
            for location, value in messages.items():
                errors.update(value if isinstance(value, dict) else {location: value})
        body["message"] = data.get("message") or _summary(errors) or err.description
        if errors:
            body["errors"] = errors
        # The exception's own headers (a 405's Allow, a 401's WWW-Authenticate) stay; the body is ours.
        headers = {name: value for name, value in err.get_headers() if name.lower() != "content-type"}
        headers.update(data.get("headers") or {})
        return jsonify(body), err.code, headers

    @app.errorhandler(storage.Unavailable)
    def media_store_unavailable(err: storage.Unavailable):
        # The files API and the submit-time checks alike; the store has logged the cause.
        return http_error(ServiceUnavailable(description=err.message))

    @app.errorhandler(Exception)
    def unexpected(err: Exception):
        log.exception("unhandled error")
        return http_error(InternalServerError(description="internal error"))


def _summary(errors: Mapping | None) -> str | None:
    if not errors:
        return None
    return "invalid request: " + "; ".join(
        f"{field}: {message if isinstance(message, str) else _flatten(message)}" for field, message in errors.items()
    )


def _flatten(value) -> str:
    if isinstance(value, list):
        return " ".join(_flatten(v) for v in value)
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_flatten(v)}" for k, v in value.items())
    return str(value)
