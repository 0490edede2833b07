#!/opt/venv/bin/python
"""`lorapool-ensure-bucket`: create the blob bucket named by LORAPOOL_BLOB_URL if it is missing.

The compose stack's one-shot `create-bucket` service runs it against the S3-compatible store
(MinIO by default) with the same `LORAPOOL_S3_*` settings the gateway and workers use, so no
separate S3 client image is needed. Idempotent; retries while the store is starting.
"""

from __future__ import annotations

import os
import sys
import time
from urllib.parse import urlparse

import boto3
from botocore.exceptions import BotoCoreError, ClientError

ATTEMPTS = 30
PAUSE_S = 2.0
EXISTS_CODES = frozenset({"BucketAlreadyOwnedByYou", "BucketAlreadyExists"})


def bucket_of(url: str) -> str:
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise SystemExit(
            f"lorapool-ensure-bucket: LORAPOOL_BLOB_URL is not s3://bucket/...: {url!r}"
        )
    return parsed.netloc


def ensure(client: object, bucket: str, region: str | None) -> str:
    try:
        client.head_bucket(Bucket=bucket)  # type: ignore[attr-defined]
        return "exists"
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise
    extra = (
        {"CreateBucketConfiguration": {"LocationConstraint": region}}
        if region and region != "us-east-1"
        else {}
    )
    try:
        client.create_bucket(Bucket=bucket, **extra)  # type: ignore[attr-defined]
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in EXISTS_CODES:
            raise
        return "exists"
    return "created"


def main() -> int:
    env = os.environ
    url = env.get("LORAPOOL_BLOB_URL")
    if not url:
        sys.stdout.write("LORAPOOL_BLOB_URL is not set: blobs are local, no bucket needed\n")
        return 0
    bucket = bucket_of(url)
    region = env.get("LORAPOOL_S3_REGION") or None
    client = boto3.client(
        "s3",
        endpoint_url=env.get("LORAPOOL_S3_ENDPOINT_URL") or None,
        aws_access_key_id=env.get("LORAPOOL_S3_ACCESS_KEY_ID") or None,
        aws_secret_access_key=env.get("LORAPOOL_S3_SECRET_ACCESS_KEY") or None,
        region_name=region,
    )
    for attempt in range(1, ATTEMPTS + 1):
        try:
            outcome = ensure(client, bucket, region)
        except (BotoCoreError, ClientError) as exc:
            if attempt == ATTEMPTS:
                sys.stderr.write(f"lorapool-ensure-bucket: {bucket}: {exc}\n")
                return 1
            time.sleep(PAUSE_S)
            continue
        sys.stdout.write(f"bucket {bucket}: {outcome}\n")
        return 0
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
