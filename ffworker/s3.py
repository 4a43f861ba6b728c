"""The object-storage bucket behind ``FFWORKER_STORAGE_URL=s3://bucket/prefix``.

Where each tenant's file lives (``<prefix>/<tenant>/<path>``), the boto3 clients a
process uses, and presigned download URLs. Endpoint, region and credentials are
boto3's own: ``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY`` (or any other source boto3 reads). Addressing is
path-style, which every S3-compatible server understands.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

import boto3
import botocore.session
from botocore.config import Config
from botocore.exceptions import ClientError
from botocore.loaders import create_loader

# Multipart uploads: parts of this size (S3's minimum part is 5 MiB, its maximum count
# 10,000: 16 MiB parts reach 156 GiB, beyond FFWORKER_MAX_UPLOAD_BYTES's useful range).
PART_BYTES = 16 * 1024 * 1024
_CLIENT_CONFIG = Config(
    s3={"addressing_style": "path"},
    retries={"max_attempts": 5, "mode": "standard"},
    connect_timeout=10,
    read_timeout=60,
    signature_version="s3v4",
)


# What an S3 error code says, for every module that asks the bucket something. A HEAD's error
# has no body: its code is then its HTTP status.
NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
REFUSED_CODES = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"})


def error_code(exc: ClientError) -> str:
    """The S3 error code of a failed request (its HTTP status when the answer had no code)."""
    return str(exc.response.get("Error", {}).get("Code") or exc.response.get("ResponseMetadata", {})
               .get("HTTPStatusCode") or "")


@dataclass(frozen=True)
class Bucket:
    name: str
    prefix: str   # without leading or trailing "/"; "" for the bucket's root

    @classmethod
    def from_url(cls, url: str) -> "Bucket":
        parts = urlsplit(url)
        return cls(parts.netloc, parts.path.strip("/"))

    def tenant_prefix(self, tenant: str) -> str:
        """The keys of one tenant's files start with this (ends with "/")."""
        return f"{self.prefix}/{tenant}/" if self.prefix else f"{tenant}/"

    def key(self, tenant: str, user_path: str) -> str:
        return self.tenant_prefix(tenant) + user_path


def bucket(settings) -> Bucket | None:
    """The configured bucket, or None when the media store is the local root."""
    return Bucket.from_url(settings.storage_url) if settings.storage_url else None


# Service models read once per process: a client of a fresh session otherwise reads them again
# (≈ 50 ms; ≈ 10 ms with them loaded).
_MODELS = create_loader()


def _new_client(endpoint_url: str | None):
    """A client of a session of its own, which reads the AWS_* variables as they are now."""
    core = botocore.session.get_session()
    core.register_component("data_loader", _MODELS)
    return boto3.session.Session(botocore_session=core).client("s3", endpoint_url=endpoint_url,
                                                               config=_CLIENT_CONFIG)


@functools.lru_cache(maxsize=8)
def client(endpoint_url: str | None = None):
    """A boto3 S3 client (thread-safe; one per process and endpoint). ``endpoint_url``
    None: boto3's own configuration (``AWS_ENDPOINT_URL`` and the rest)."""
    return _new_client(endpoint_url)


@functools.lru_cache(maxsize=8)
def no_replace_client(endpoint_url: str | None = None):
    """A client whose object writes never replace an object: every PutObject and
    CompleteMultipartUpload carries ``If-None-Match: *``, so a key taken meanwhile answers
    412 PreconditionFailed instead. A client of its own because boto3's transfer manager
    passes no such argument through; its other requests are the plain client's."""
    conditional = _new_client(endpoint_url)
    for operation in ("PutObject", "CompleteMultipartUpload"):
        conditional.meta.events.register(f"before-parameter-build.s3.{operation}", _if_none_match)
    return conditional


def _if_none_match(params: dict, **_) -> None:
    params["IfNoneMatch"] = "*"


def output_urls(settings, tenant: str) -> Callable[[str], str] | None:
    """In object-storage mode, the presigned URL of each of ``tenant``'s files by its path
    (what ``result.outputs[].url`` shows); None with the local media root."""
    store = bucket(settings)
    if store is None:
        return None
    return lambda user_path: presigned_get(settings, store.key(tenant, user_path))


def presigned_get(settings, key: str) -> str:
    """A GET URL of ``key`` valid for ``FFWORKER_PRESIGN_EXPIRES_S``, signed for the address
    clients use (``FFWORKER_STORAGE_PUBLIC_URL``, else the workers' own endpoint)."""
    signer = client(settings.storage_public_url)
    return signer.generate_presigned_url(
        "get_object", Params={"Bucket": bucket(settings).name, "Key": key},
        ExpiresIn=settings.presign_expires_s,
    )
