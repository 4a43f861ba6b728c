"""The ``/v1/files`` endpoints: a tenant's media store over HTTP.

Names follow exactly the rules job paths follow (``storage.py`` through ``paths.py``),
so a file uploaded here is an input a job may name and a job's output is a file a
client may download. The store is the local directory or the bucket
(``storage.for_tenant``); this module knows only their common interface. Bodies stream
in both directions: an upload is read in 1 MiB chunks and written as it comes (never
held in memory whole), a download is served from the open file or the object with
Range and conditional requests.
"""
from __future__ import annotations

import base64
import binascii

import marshmallow as ma
from flask import Response, g, request
from flask.views import MethodView
from flask_smorest import Blueprint, abort
from werkzeug.exceptions import RequestEntityTooLarge

from ffworker import paths, storage
from ffworker.api_support import require_tenant
from ffworker.extensions import services

blp = Blueprint("files", __name__, url_prefix="/v1/files", description="The tenant's media files")
blp.before_request(require_tenant)
MAX_LIST_LIMIT = 1000


class FileEntrySchema(ma.Schema):
    name = ma.fields.String(required=True)
    size = ma.fields.Integer(required=True)
    mtime = ma.fields.Float(required=True)


class FileListSchema(ma.Schema):
    files = ma.fields.List(ma.fields.Nested(FileEntrySchema), required=True)
    next_cursor = ma.fields.String(allow_none=True, required=True)


class StoredFileSchema(ma.Schema):
    path = ma.fields.String(required=True)
    size = ma.fields.Integer(required=True)
    sha256 = ma.fields.String(required=True, metadata={"description": "hex SHA-256 of the stored bytes"})


class FileListArgsSchema(ma.Schema):
    prefix = ma.fields.String(load_default="")
    cursor = ma.fields.String()
    limit = ma.fields.Integer(load_default=100, validate=ma.validate.Range(min=1, max=MAX_LIST_LIMIT))


def _store() -> storage.LocalStore | storage.S3Store:
    return storage.for_tenant(services().settings, g.tenant.name)


def _checked(file_path: str) -> str:
    """422 for a name no job could use either (the same message a job submit would give)."""
    try:
        paths.check_user_path(file_path)
    except paths.UnsafePath as exc:
        abort(422, errors={"path": [exc.message]})
    return file_path


def _encode_cursor(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> str:
    try:
        return base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        abort(422, message="invalid cursor", errors={"cursor": ["not a cursor this API returned"]})


@blp.route("")
class Files(MethodView):
    @blp.arguments(FileListArgsSchema, location="query")
    @blp.response(200, FileListSchema)
    def get(self, args):
        """List the tenant's files in name order (``prefix`` filters, ``cursor`` pages)."""
        limit = args["limit"]
        after = _decode_cursor(args["cursor"]) if args.get("cursor") else None
        entries = _store().list(args["prefix"], after=after, limit=limit + 1)
        next_cursor = _encode_cursor(entries[limit - 1].name) if len(entries) > limit else None
        return {
            "files": [{"name": e.name, "size": e.size, "mtime": e.mtime} for e in entries[:limit]],
            "next_cursor": next_cursor,
        }


@blp.route("/<path:file_path>")
class File(MethodView):
    @blp.doc(requestBody={"required": True, "content": {"application/octet-stream": {
        "schema": {"type": "string", "format": "binary"}}}})
    @blp.response(201, StoredFileSchema)
    @blp.alt_response(411, description="Neither Content-Length nor chunked encoding")
    @blp.alt_response(412, description="If-None-Match: * and the file exists")
    @blp.alt_response(413, description="Larger than FFWORKER_MAX_UPLOAD_BYTES")
    def put(self, file_path):
        """Upload a file (streamed; ``If-None-Match: *`` refuses to replace one)."""
        _checked(file_path)
        if file_path.endswith("/"):
            abort(422, errors={"path": ["a file name must not end with '/'"]})
        limit = services().settings.max_upload_bytes
        if request.content_length is not None and request.content_length > limit:
            abort(413, message=f"the body is larger than the upload limit of {limit} bytes")
        if request.content_length is None and not request.environ.get("wsgi.input_terminated"):
            abort(411, message="send Content-Length or Transfer-Encoding: chunked")
        # The app-wide 1 MiB body limit is for JSON requests; an upload has its own.
        request.max_content_length = limit
        replace = request.headers.get("If-None-Match", "").strip() != "*"
        try:
            stored = _store().put(file_path, request.stream, max_bytes=limit, replace=replace)
        except paths.UnsafePath as exc:
            abort(422, errors={"path": [exc.message]})
        except (storage.TooLarge, RequestEntityTooLarge):
            abort(413, message=f"the body is larger than the upload limit of {limit} bytes")
        except storage.Exists:
            abort(412, message=f"{file_path!r} exists and If-None-Match: * asked not to replace it")
        return {"path": stored.path, "size": stored.size, "sha256": stored.sha256}

    @blp.doc(responses={
        "200": {"description": "The file", "content": {"application/octet-stream": {
            "schema": {"type": "string", "format": "binary"}}}},
        "206": {"description": "The requested Range", "content": {"application/octet-stream": {
            "schema": {"type": "string", "format": "binary"}}}},
        "304": {"description": "Not modified since the ETag sent in If-None-Match"},
        "404": {"description": "No such file"},
        "416": {"description": "The Range lies outside the file"},
    })
    def get(self, file_path):
        """Download a file (Range, ETag and If-None-Match honoured; HEAD gives the headers)."""
        _checked(file_path)
        try:
            return _store().response(file_path, request.environ)
        except (paths.UnsafePath, FileNotFoundError):
            abort(404, message="file not found")

    @blp.doc(responses={"204": {"description": "Deleted"}, "404": {"description": "No such file"}})
    def delete(self, file_path):
        """Delete a file."""
        _checked(file_path)
        try:
            _store().delete(file_path)
        except (paths.UnsafePath, FileNotFoundError):
            abort(404, message="file not found")
        return Response(status=204)
