"""The object store behind attachments: any S3-compatible service, through boto3.

The bucket stays private. Clients upload straight to it with a presigned POST whose
policy pins the key, the exact content type and a content-length range, so the store
itself refuses anything else; they read through GET URLs signed when the API answers,
valid for minutes and never stored. Nothing here knows about messages or users.

Two clients: `_client` talks to the store from the server (HEAD, GET, PUT, DELETE);
`_signer` only signs, for the address clients use (`SWITCHBOARD_S3_PUBLIC_ENDPOINT_URL`,
when it differs): a SigV4 URL's signature covers its host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import boto3
import botocore.exceptions
from botocore.config import Config

from app.settings import Settings

# Transient: the store is unreachable, slow or shedding load. A task retries these; the
# API answers 503.
_TRANSIENT_CODES = frozenset(
    {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "Throttling"}
)
_MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound"})


class StorageUnavailable(Exception):
    """The object store could not be reached or failed on its side; try again later."""


@dataclass(frozen=True, slots=True)
class StoredObject:
    size: int
    content_type: str | None


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return error.get("Code") in _TRANSIENT_CODES or status >= 500
    return isinstance(exc, botocore.exceptions.BotoCoreError | botocore.exceptions.HTTPClientError)


def _is_missing(exc: BaseException) -> bool:
    return (
        isinstance(exc, botocore.exceptions.ClientError)
        and exc.response.get("Error", {}).get("Code") in _MISSING_CODES
    )


def _raise_for(exc: Exception) -> None:
    """StorageUnavailable for a transient failure; anything else (a 403 from wrong
    credentials or a bucket policy) propagates as it is: retrying will not mend it."""
    if _is_transient(exc):
        raise StorageUnavailable(f"the object store failed: {exc}") from exc
    raise exc


class ObjectStore:
    """One bucket of an S3-compatible store."""

    def __init__(self, settings: Settings) -> None:
        if not settings.s3_bucket:
            raise ValueError("ObjectStore needs SWITCHBOARD_S3_BUCKET")
        self.bucket = settings.s3_bucket
        self.upload_ttl_seconds = settings.s3_upload_ttl_seconds
        self.url_ttl_seconds = settings.s3_url_ttl_seconds
        # Path-style for custom endpoints (MinIO, SeaweedFS, R2 all take it); AWS itself
        # gets virtual-hosted addressing.
        style = "path" if settings.s3_endpoint_url else "virtual"
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": style},
            connect_timeout=3,
            read_timeout=15,
            retries={"max_attempts": 2, "mode": "standard"},
        )
        credentials: dict[str, Any] = {}
        if settings.aws_access_key_id:
            credentials = {
                "aws_access_key_id": settings.aws_access_key_id,
                "aws_secret_access_key": settings.aws_secret_access_key,
            }
        # A session of our own: boto3's default session is not safe to share across threads.
        session = boto3.session.Session(region_name=settings.aws_region, **credentials)
        self._client = session.client("s3", endpoint_url=settings.s3_endpoint_url, config=config)
        public = settings.s3_public_endpoint_url or settings.s3_endpoint_url
        self._signer = (
            self._client
            if public == settings.s3_endpoint_url
            else session.client("s3", endpoint_url=public, config=config)
        )

    # ------------------------------------------------------------------ signing (local)

    def presigned_upload(self, key: str, content_type: str, max_bytes: int) -> dict[str, Any]:
        """`{url, fields}` for an HTML-form POST of one object at `key`, of exactly
        `content_type` and 1 to `max_bytes` bytes, within the upload TTL."""
        return self._signer.generate_presigned_post(
            self.bucket,
            key,
            Fields={"Content-Type": content_type},
            Conditions=[
                {"Content-Type": content_type},
                ["content-length-range", 1, max_bytes],
            ],
            ExpiresIn=self.upload_ttl_seconds,
        )

    def signed_url(self, key: str) -> str:
        """A GET URL for `key`, valid for the URL TTL."""
        return self._signer.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": key},
            ExpiresIn=self.url_ttl_seconds,
        )

    # ------------------------------------------------------------------ the store (network)

    def head(self, key: str) -> StoredObject | None:
        """The object's size and content type, or None when there is no such object."""
        try:
            answer = self._client.head_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            if _is_missing(exc):
                return None
            _raise_for(exc)
            raise
        return StoredObject(int(answer["ContentLength"]), answer.get("ContentType"))

    def read(self, key: str, max_bytes: int) -> bytes | None:
        """The object's bytes (at most `max_bytes + 1` of them are read, so a caller can
        tell an object that grew past its limit), or None when there is no such object."""
        try:
            answer = self._client.get_object(
                Bucket=self.bucket, Key=key, Range=f"bytes=0-{max_bytes}"
            )
            return answer["Body"].read(max_bytes + 1)
        except Exception as exc:
            if _is_missing(exc):
                return None
            _raise_for(exc)
            raise

    def put(self, key: str, data: bytes, content_type: str) -> None:
        try:
            self._client.put_object(
                Bucket=self.bucket, Key=key, Body=data, ContentType=content_type
            )
        except Exception as exc:
            _raise_for(exc)

    def set_content_type(self, key: str, content_type: str) -> None:
        """Rewrite the object's Content-Type in place (the bytes turned out to be another
        allowed image type than the one declared)."""
        try:
            self._client.copy_object(
                Bucket=self.bucket,
                Key=key,
                CopySource={"Bucket": self.bucket, "Key": key},
                ContentType=content_type,
                MetadataDirective="REPLACE",
            )
        except Exception as exc:
            _raise_for(exc)

    def delete(self, keys: list[str]) -> None:
        """Delete these objects; a key with no object is not an error (S3 says so too)."""
        for start in range(0, len(keys), 1000):  # DeleteObjects takes 1,000 keys a call
            chunk = keys[start : start + 1000]
            try:
                answer = self._client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": key} for key in chunk], "Quiet": True},
                )
            except Exception as exc:
                _raise_for(exc)
            failed = [e for e in answer.get("Errors", []) if e.get("Code") not in _MISSING_CODES]
            if failed:
                raise StorageUnavailable(
                    f"the store did not delete {len(failed)} objects: {failed[0].get('Code')}"
                )

    def ping(self) -> None:
        """Raises StorageUnavailable unless the bucket answers (readiness)."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            raise StorageUnavailable(f"bucket {self.bucket!r}: {exc}") from exc
