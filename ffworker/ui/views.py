"""The dashboard's pages and actions."""
from __future__ import annotations

import uuid
from datetime import datetime, timezone
from functools import wraps
from urllib.parse import urlencode

from flask import Response, g, make_response, redirect, render_template, request, stream_with_context, url_for
from werkzeug.exceptions import HTTPException

from ffworker import kinds
from ffworker.dispatch import dispatch
from ffworker.errors import AlreadyTerminal, JobNotFound, NotRetryable
from ffworker.extensions import services
from ffworker.ledger import RETRYABLE_STATUSES
from ffworker.models import JOB_STATUSES, TERMINAL_STATUSES
from ffworker.ui import bp, queries, sessions
from ffworker.ui.stream import PageStream, stream_state

PAGE_SIZE = 50
FILTER_NAMES = ("status", "kind", "workspace", "tenant", "created_after", "created_before")
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "frame-ancestors 'none'; form-action 'self'; base-uri 'none'")


# -- request plumbing ------------------------------------------------------------------


def _secure() -> bool:
    """Served over https: the connection itself, or a trusted proxy's X-Forwarded-Proto."""
    if request.is_secure:
        return True
    if services().settings.trust_proxy:
        return request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower() == "https"
    return False


def _set_cookie(response, name: str, value: str, max_age: int | None) -> None:
    response.set_cookie(name, value, max_age=max_age, path="/ui/", secure=_secure(), httponly=True,
                        samesite="Strict")


@bp.before_request
def load_viewer():
    if request.endpoint == "ui.static":  # the stylesheet and script need no session
        g.viewer = None
        return None
    g.viewer = sessions.lookup(services().engine, request.cookies.get(sessions.COOKIE))
    if request.method == "POST" and request.endpoint != "ui.login" and g.viewer is not None:
        if not sessions.tokens_match(request.form.get("csrf_token"), g.viewer.csrf_token):
            return _page("ui/error.html", 403, title="Forbidden",
                         message="This form has expired or did not come from this dashboard. "
                                 "Go back, reload the page and try again.")
    return None


@bp.after_request
def security_headers(response):
    response.headers.setdefault("Content-Security-Policy", CSP)
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    if request.endpoint != "ui.static":
        response.headers["Cache-Control"] = "no-store"
    return response


@bp.errorhandler(HTTPException)
def http_error(err: HTTPException):
    return _page("ui/error.html", err.code or 500, title=err.name, message=err.description)


def signed_in(view):
    @wraps(view)
    def wrapper(*args, **kwargs):
        if g.viewer is None:
            if request.method == "POST":
                return _page("ui/error.html", 403, title="Forbidden", message="Sign in first.")
            return redirect(url_for("ui.login"), 303)
        return view(*args, **kwargs)

    return wrapper


def _page(template: str, status: int = 200, **context):
    return make_response(render_template(template, viewer=getattr(g, "viewer", None), **context), status)


def _not_found():
    """The same page for an id that does not exist and for another tenant's job."""
    return _page("ui/not_found.html", 404, title="Job not found")


# -- sign-in -----------------------------------------------------------------------------


@bp.route("/login", methods=["GET", "POST"])
def login():
    if request.method == "GET":
        if g.viewer is not None:
            return redirect(url_for("ui.jobs"), 303)
        return _login_form()
    if not sessions.tokens_match(request.form.get("csrf_token"), request.cookies.get(sessions.LOGIN_COOKIE)):
        return _page("ui/error.html", 403, title="Forbidden",
                     message="The sign-in form has expired. Reload it and try again.")
    key = (request.form.get("api_key") or "").strip()
    session_id = sessions.sign_in(services().engine, key) if 0 < len(key) <= 200 else None
    if session_id is None:
        return _login_form("That key was not recognised.", 401)
    response = redirect(url_for("ui.jobs"), 303)
    _set_cookie(response, sessions.COOKIE, session_id, int(sessions.LIFETIME.total_seconds()))
    response.delete_cookie(sessions.LOGIN_COOKIE, path="/ui/")
    return response


def _login_form(error: str | None = None, status: int = 200):
    token = sessions.new_token()
    response = _page("ui/login.html", status, title="Sign in", error=error, login_token=token)
    _set_cookie(response, sessions.LOGIN_COOKIE, token, 3600)
    return response


@bp.post("/logout")
@signed_in
def logout():
    sessions.sign_out(services().engine, g.viewer)
    response = redirect(url_for("ui.login"), 303)
    response.delete_cookie(sessions.COOKIE, path="/ui/", secure=_secure(), httponly=True, samesite="Strict")
    return response


# -- filters -----------------------------------------------------------------------------


class FilterError(ValueError):
    pass


def _parse_time(value: str, name: str):
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise FilterError(f"{name}: give a date and time like 2024-05-01T12:00 (UTC) or with an offset")
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _filters(source) -> tuple[dict, dict]:
    """(ledger filters, the query parameters as given) from the REST-named parameters."""
    given = {name: source.get(name, "").strip() for name in FILTER_NAMES}
    given = {name: value for name, value in given.items() if value}
    filters: dict = {}
    if "status" in given:
        if given["status"] not in JOB_STATUSES:
            raise FilterError(f"status: one of {', '.join(JOB_STATUSES)}")
        filters["status"] = given["status"]
    if "kind" in given:
        if kinds.get(given["kind"]) is None:
            raise FilterError(f"kind: one of {', '.join(kinds.names())}")
        filters["kind"] = given["kind"]
    if "workspace" in given:
        filters["workspace"] = given["workspace"][:64]
    for name in ("created_after", "created_before"):
        if name in given:
            filters[name] = _parse_time(given[name], name)
    if g.viewer.is_operator:
        if "tenant" in given:
            tenant_id = queries.tenant_id(services().engine, given["tenant"])
            # An unknown tenant matches nothing (the nil uuid is nobody's id).
            filters["tenant_id"] = tenant_id if tenant_id is not None else uuid.UUID(int=0)
    else:
        given.pop("tenant", None)
        filters["tenant_id"] = g.viewer.tenant_id
    return filters, given


# -- jobs ------------------------------------------------------------------------------------


@bp.get("/")
def index():
    return redirect(url_for("ui.jobs"), 303)


@bp.get("/jobs")
@signed_in
def jobs():
    engine = services().engine
    tenants = queries.tenant_names(engine) if g.viewer.is_operator else []
    try:
        filters, given = _filters(request.args)
    except FilterError as exc:
        return _page("ui/jobs.html", 400, title="Jobs", error=str(exc), rows=[], given={}, tenants=tenants,
                     statuses=JOB_STATUSES, kinds=kinds.names(), next_url=None, stream_url=None, q="")
    q = request.args.get("q", "").strip()
    id_prefix = None
    if q:
        try:
            return redirect(url_for("ui.job", job_id=str(uuid.UUID(q))), 303)
        except ValueError:
            id_prefix = queries.id_range(q)
            if id_prefix is None:
                return _page("ui/jobs.html", 400, title="Jobs", error="search: give a job id or its first characters",
                             rows=[], given=given, tenants=tenants, statuses=JOB_STATUSES, kinds=kinds.names(),
                             next_url=None, stream_url=None, q=q)
    cursor = request.args.get("cursor")
    before = queries.decode_cursor(cursor) if cursor else None
    rows, now = queries.list_jobs(engine, filters, limit=PAGE_SIZE + 1, before=before, id_prefix=id_prefix)
    next_url = None
    if len(rows) > PAGE_SIZE:
        rows = rows[:PAGE_SIZE]
        next_url = url_for("ui.jobs", **given, **({"q": q} if q else {}), cursor=queries.encode_cursor(rows[-1]))
    stream_args = {**given, "ids": ",".join(str(r["id"]) for r in rows)}
    if before is None and not q:  # the first page shows new jobs as they are submitted
        stream_args["since"] = now.isoformat()
    return _page("ui/jobs.html", title="Jobs", rows=rows, given=given, tenants=tenants, statuses=JOB_STATUSES,
                 kinds=kinds.names(), next_url=next_url, stream_url=url_for("ui.stream", **stream_args), q=q,
                 error=None, paged=before is not None)


@bp.get("/jobs/<job_id>")
@signed_in
def job(job_id: str):
    try:
        job_uuid = uuid.UUID(job_id)
    except ValueError:
        return _not_found()
    row, trail = queries.job(services().engine, job_uuid, g.viewer.tenant_id)
    if row is None:
        return _not_found()
    stream_url = None if row["status"] in TERMINAL_STATUSES else url_for("ui.stream", ids=str(row["id"]), detail=1)
    return _page("ui/job.html", title=f"Job {str(row['id'])[:8]}", job=row, trail=trail, stream_url=stream_url,
                 terminal=TERMINAL_STATUSES, retryable=RETRYABLE_STATUSES)


@bp.post("/jobs/<job_id>/cancel")
@signed_in
def cancel(job_id: str):
    row = _own_job(job_id)
    if row is None:
        return _not_found()
    try:
        services().ledger.request_cancel(row["id"], row["tenant_id"])
    except JobNotFound:
        return _not_found()
    except AlreadyTerminal:
        pass  # it ended meanwhile: the page shows how
    return redirect(url_for("ui.job", job_id=str(row["id"])), 303)


@bp.post("/jobs/<job_id>/retry")
@signed_in
def retry(job_id: str):
    row = _own_job(job_id)
    if row is None:
        return _not_found()
    current = services()
    try:
        retried = current.ledger.retry(row["id"], g.viewer.tenant_id, current.settings.max_attempts)
    except JobNotFound:
        return _not_found()
    except NotRetryable:
        return redirect(url_for("ui.job", job_id=str(row["id"])), 303)
    dispatch(retried["id"])
    return redirect(url_for("ui.job", job_id=str(row["id"])), 303)


def _own_job(job_id: str):
    try:
        job_uuid = uuid.UUID(job_id)
    except ValueError:
        return None
    return services().ledger.get(job_uuid, tenant_id=g.viewer.tenant_id)


# -- bulk actions ----------------------------------------------------------------------------

BULK = {
    "cancel": {"statuses": ("queued", "running"), "verb": "Cancel", "button": "Cancel all matching"},
    "retry": {"statuses": RETRYABLE_STATUSES, "verb": "Retry", "button": "Retry all matching"},
}


def _bulk_request(source) -> tuple[str, dict, dict]:
    """(action, ledger filters, parameters as given) of a bulk request; FilterError for a bad one."""
    action = source.get("action", "")
    if action not in BULK:
        raise FilterError("action: cancel or retry")
    filters, given = _filters(source)
    return action, filters, given


@bp.get("/jobs/bulk")
@signed_in
def bulk_confirm():
    try:
        action, filters, given = _bulk_request(request.args)
    except FilterError as exc:
        return _page("ui/error.html", 400, title="Bad request", message=str(exc))
    engine = services().engine
    as_of = queries.db_now(engine)
    count = queries.count_jobs(engine, {**filters, "as_of": as_of}, BULK[action]["statuses"],
                               not_cancel_requested_running=action == "cancel")
    return _page("ui/confirm.html", title=f"{BULK[action]['verb']} all matching", action=action, spec=BULK[action],
                 count=count, given=given, as_of=as_of.isoformat(), back_url=url_for("ui.jobs", **given))


@bp.post("/jobs/bulk")
@signed_in
def bulk_act():
    try:
        action, filters, given = _bulk_request(request.form)
        as_of = _parse_time(request.form.get("as_of", ""), "as_of")
    except FilterError as exc:
        return _page("ui/error.html", 400, title="Bad request", message=str(exc))
    current = services()
    filters["as_of"] = as_of
    if action == "retry":
        ids = current.ledger.retry_matching(filters, current.settings.max_attempts)
        for job_id in ids:
            dispatch(job_id)
        message = f"Re-queued {len(ids)} job{'s' if len(ids) != 1 else ''}."
    else:
        ids = current.ledger.cancel_matching(filters)
        message = f"Cancelled {len(ids)} job{'s' if len(ids) != 1 else ''} (running ones stop within a second)."
    return _page("ui/done.html", title="Done", message=message, count=len(ids), back_url=url_for("ui.jobs", **given))


# -- the live stream ---------------------------------------------------------------------------


@bp.get("/stream")
def stream():
    if g.viewer is None:
        return Response("sign in first\n", 401, mimetype="text/plain")
    ids = []
    for value in request.args.get("ids", "").split(",")[:PAGE_SIZE * 4]:
        try:
            ids.append(str(uuid.UUID(value)))
        except ValueError:
            continue
    newer = None
    if request.args.get("since"):
        try:
            filters, _ = _filters(request.args)
            newer = (filters, _parse_time(request.args["since"], "since"))
        except FilterError:
            return Response("bad filter\n", 400, mimetype="text/plain")
    detail = request.args.get("detail") == "1"
    state = stream_state()
    if not state.slots.try_acquire():
        return Response("too many open streams; retry shortly\n", 503, mimetype="text/plain",
                        headers={"Retry-After": str(state.limits.retry_after_s)})
    page = PageStream(services().engine, state.slots, state.limits, ids, g.viewer.tenant_id, newer,
                      _detail_update if detail else _row_update, lambda: state.hub.draining,
                      end_when_terminal=detail)
    response = Response(stream_with_context(iter(page)), mimetype="text/event-stream")
    response.call_on_close(page.close)
    response.headers["Cache-Control"] = "no-cache, no-store"
    response.headers["X-Accel-Buffering"] = "no"
    return response


def _summary(row: dict) -> dict:
    return {"id": str(row["id"]), "status": row["status"], "percent": row["progress_percent"],
            "attempts": row["attempts"], "max_attempts": row["max_attempts"],
            "eta_s": row["progress_eta_s"], "speed": row["progress_speed"],
            "at": row["progress_at"].isoformat() if row["progress_at"] else None,
            "terminal": row["status"] in TERMINAL_STATUSES}


def _row_update(row: dict) -> dict:
    return {**_summary(row), "html": render_template("ui/_row.html", row=row, viewer=g.viewer)}


def _detail_update(row: dict) -> dict:
    return {**_summary(row), "html": render_template("ui/_summary.html", job=row, viewer=g.viewer,
                                                       terminal=TERMINAL_STATUSES, retryable=RETRYABLE_STATUSES)}


# -- overview -------------------------------------------------------------------------------------


@bp.get("/overview")
@signed_in
def overview():
    current = services()
    tenant_name = None if g.viewer.is_operator else g.viewer.name
    tenant_id = g.viewer.tenant_id
    tenants = queries.tenant_names(current.engine) if g.viewer.is_operator else []
    chosen = request.args.get("tenant", "").strip() if g.viewer.is_operator else ""
    if chosen:
        tenant_id = queries.tenant_id(current.engine, chosen) or uuid.UUID(int=0)
        tenant_name = chosen
    data = queries.overview(current.engine, tenant_id=tenant_id, tenant_name=tenant_name,
                            stale_after_s=current.settings.stale_after_s)
    return _page("ui/overview.html", title="Overview", data=data, tenants=tenants, chosen=chosen,
                 jobs_url=lambda **kw: url_for("ui.jobs", **kw))


@bp.app_template_filter("ui_when")
def when(value) -> str:
    if value is None:
        return "–"
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


@bp.app_template_filter("ui_seconds")
def seconds(value) -> str:
    if value is None:
        return "–"
    value = float(value)
    if value < 60:
        return f"{value:.1f} s"
    if value < 3600:
        return f"{value // 60:.0f} min {value % 60:.0f} s"
    return f"{value // 3600:.0f} h {value % 3600 // 60:.0f} min"


@bp.app_template_global("ui_query")
def ui_query(**params) -> str:
    return urlencode({k: v for k, v in params.items() if v not in (None, "")})
