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
from urllib.parse import urlsplit

import boto3
from botocore.config import Config

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


@functools.lru_cache(maxsize=8)
def client(endpoint_url: str | None = None):
    """A boto3 S3 client (thread-safe; one per process and endpoint). ``endpoint_url``
    None: boto3's own configuration (``AWS_ENDPOINT_URL`` and the rest)."""
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=_CLIENT_CONFIG)


def presigned_get(settings, key: str) -> str:
    """A GET URL of ``key`` valid for ``FFWORKER_PRESIGN_EXPIRES_S``, signed for the address
    clients use (``FFWORKER_STORAGE_PUBLIC_URL``, else the workers' own endpoint)."""
    signer = client(settings.storage_public_url)
    return signer.generate_presigned_url(
        "get_object", Params={"Bucket": bucket(settings).name, "Key": key},
        ExpiresIn=settings.presign_expires_s,
    )
