"""What every blob backend shares: digest checks, the key layout, hashing a file.

Both backends (`blobs.LocalBlobStore`, `s3blobs.S3BlobStore`) import this module and
never each other, so the backends form no import cycle.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from adapter_store.errors import InvalidDigest

CHUNK = 1024 * 1024
# Full match only: `\Z` (not `$`) so a trailing newline never passes.
DIGEST_RE = re.compile(r"\A[0-9a-f]{64}\Z")
BlobSource = bytes | Path


def is_digest(text: object) -> bool:
    return isinstance(text, str) and DIGEST_RE.fullmatch(text) is not None


def check_digest(digest: str) -> str:
    if not is_digest(digest):
        raise InvalidDigest(f"not a sha256 hex digest: {digest!r}")
    return digest


def sha256_file(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def blob_key(digest: str) -> str:
    """The relative location of a blob: sha256/ab/cdef… ."""
    check_digest(digest)
    return f"sha256/{digest[:2]}/{digest[2:]}"
