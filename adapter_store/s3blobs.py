"""The S3-compatible blob backend (AWS S3, MinIO, moto...) for multi-host deployments."""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import boto3
from botocore.exceptions import ClientError

from adapter_store.blobkeys import CHUNK, BlobSource, blob_key, is_digest, sha256_file
from adapter_store.errors import BlobCorrupt, BlobNotFound
from adapter_store.settings import SettingsError, StoreSettings

MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound"})


def parse_s3_url(url: str) -> tuple[str, str]:
    """s3://bucket/some/prefix → ("bucket", "some/prefix")."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise SettingsError(f"not an s3://bucket[/prefix] URL: {url!r}")
    return parsed.netloc, parsed.path.strip("/")


class S3BlobStore:
    """Blobs as objects `prefix/sha256/ab/cdef…` in one bucket."""

    def __init__(self, client: Any, bucket: str, prefix: str = "") -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")

    @classmethod
    def from_settings(cls, settings: StoreSettings) -> S3BlobStore:
        if not settings.blob_url:
            raise SettingsError("S3 blob store needs a blob URL (LORAPOOL_BLOB_URL)")
        bucket, prefix = parse_s3_url(settings.blob_url)
        client = boto3.client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            aws_access_key_id=settings.s3_access_key_id,
            aws_secret_access_key=settings.s3_secret_access_key,
            region_name=settings.s3_region,
        )
        return cls(client, bucket, prefix)

    def _key(self, digest: str) -> str:
        key = blob_key(digest)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, source: BlobSource) -> str:
        # Always (re)write: the object's LastModified is its age, so a re-put
        # restarts the gc grace period just as the local backend's utime does.
        if isinstance(source, bytes):
            digest = hashlib.sha256(source).hexdigest()
            self.client.put_object(Bucket=self.bucket, Key=self._key(digest), Body=source)
        else:
            digest = sha256_file(Path(source))
            self.client.upload_file(str(source), self.bucket, self._key(digest))
        return digest

    def _body(self, digest: str) -> Any:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(digest))["Body"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in MISSING_CODES:
                raise BlobNotFound(f"no blob {digest}") from exc
            raise

    def get(self, digest: str) -> bytes:
        data = self._body(digest).read()
        if hashlib.sha256(data).hexdigest() != digest:
            raise BlobCorrupt(f"blob {digest} does not match its digest")
        return data

    def fetch_to(self, digest: str, dest: Path) -> None:
        body = self._body(digest)
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}-")
        hasher = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := body.read(CHUNK):
                    hasher.update(chunk)
                    out.write(chunk)
            if hasher.hexdigest() != digest:
                raise BlobCorrupt(f"blob {digest} does not match its digest")
            os.replace(tmp_name, dest)
        finally:
            Path(tmp_name).unlink(missing_ok=True)

    def _head(self, digest: str) -> dict[str, Any]:
        try:
            head: dict[str, Any] = self.client.head_object(
                Bucket=self.bucket, Key=self._key(digest)
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in MISSING_CODES:
                raise BlobNotFound(f"no blob {digest}") from exc
            raise
        return head

    def exists(self, digest: str) -> bool:
        try:
            self._head(digest)
        except BlobNotFound:
            return False
        return True

    def delete(self, digest: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(digest))

    def list_digests(self) -> Iterator[str]:
        root = f"{self.prefix}/sha256/" if self.prefix else "sha256/"
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=root):
            for item in page.get("Contents", []):
                digest = item["Key"][len(root) :].replace("/", "")
                if is_digest(digest):
                    yield digest

    def age(self, digest: str) -> float:
        return time.time() - self._head(digest)["LastModified"].timestamp()
