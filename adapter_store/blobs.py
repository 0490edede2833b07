"""Content-addressed blob store: the interface, the local-directory backend, the factory.

A blob's name is the sha256 of its bytes. Puts are idempotent and refresh the
blob's age (so the garbage collector's grace period restarts for a blob an
upload is about to reference); reads verify the digest.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from adapter_store.blobkeys import (
    CHUNK,
    DIGEST_RE,
    BlobSource,
    blob_key,
    check_digest,
    is_digest,
    sha256_file,
)
from adapter_store.errors import BlobCorrupt, BlobNotFound, InvalidDigest

if TYPE_CHECKING:
    from adapter_store.settings import StoreSettings

__all__ = [
    "CHUNK",
    "DIGEST_RE",
    "BlobCorrupt",
    "BlobNotFound",
    "BlobSource",
    "BlobStore",
    "InvalidDigest",
    "LocalBlobStore",
    "blob_key",
    "check_digest",
    "open_blob_store",
    "sha256_file",
]


@runtime_checkable
class BlobStore(Protocol):
    """Where adapter blobs live, addressed by the sha256 of their bytes."""

    def put(self, source: BlobSource) -> str:
        """Store bytes (or a file's bytes); return the digest. Idempotent."""
        ...

    def get(self, digest: str) -> bytes:
        """The blob's bytes, verified; BlobNotFound or BlobCorrupt otherwise."""
        ...

    def fetch_to(self, digest: str, dest: Path) -> None:
        """Write the blob to `dest` atomically, verified before it appears there."""
        ...

    def exists(self, digest: str) -> bool: ...

    def delete(self, digest: str) -> None:
        """Remove a blob; removing a missing blob is not an error."""
        ...

    def list_digests(self) -> Iterator[str]: ...

    def age(self, digest: str) -> float:
        """Seconds since the blob was last written (or re-put)."""
        ...


class LocalBlobStore:
    """Blobs as files under `root/sha256/ab/cdef…`, written atomically via `root/tmp/`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path_for(self, digest: str) -> Path:
        return self.root / blob_key(digest)

    def _tmp_dir(self) -> Path:
        tmp = self.root / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        return tmp

    def put(self, source: BlobSource) -> str:
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp_dir(), prefix="put-")
        tmp = Path(tmp_name)
        try:
            digest = _copy_hashing(source, fd)
            final = self.path_for(digest)
            if final.exists():
                os.utime(final)  # restart the gc grace period
            else:
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return digest

    def get(self, digest: str) -> bytes:
        try:
            data = self.path_for(digest).read_bytes()
        except FileNotFoundError as exc:
            raise BlobNotFound(f"no blob {digest}") from exc
        if hashlib.sha256(data).hexdigest() != digest:
            raise BlobCorrupt(f"blob {digest} does not match its digest")
        return data

    def fetch_to(self, digest: str, dest: Path) -> None:
        source = self.path_for(digest)
        if not source.is_file():
            raise BlobNotFound(f"no blob {digest}")
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}-")
        try:
            if _copy_hashing(source, fd) != digest:
                raise BlobCorrupt(f"blob {digest} does not match its digest")
            os.replace(tmp_name, dest)
        finally:
            Path(tmp_name).unlink(missing_ok=True)

    def exists(self, digest: str) -> bool:
        return self.path_for(digest).is_file()

    def delete(self, digest: str) -> None:
        self.path_for(digest).unlink(missing_ok=True)

    def list_digests(self) -> Iterator[str]:
        base = self.root / "sha256"
        if not base.is_dir():
            return
        for prefix in sorted(base.iterdir()):
            for blob in sorted(prefix.iterdir()):
                digest = prefix.name + blob.name
                if is_digest(digest):
                    yield digest

    def age(self, digest: str) -> float:
        try:
            return time.time() - self.path_for(digest).stat().st_mtime
        except FileNotFoundError as exc:
            raise BlobNotFound(f"no blob {digest}") from exc

    def collect_temp_files(self, grace_s: float) -> int:
        """Remove leftovers of interrupted puts older than `grace_s`; return how many."""
        removed = 0
        for tmp in self._tmp_dir().iterdir():
            if time.time() - tmp.stat().st_mtime > grace_s:
                tmp.unlink(missing_ok=True)
                removed += 1
        return removed


def _copy_hashing(source: BlobSource, fd: int) -> str:
    """Write `source` to the open descriptor `fd` (then close it), fsynced; return its sha256."""
    hasher = hashlib.sha256()
    with os.fdopen(fd, "wb") as out:
        if isinstance(source, bytes):
            hasher.update(source)
            out.write(source)
        else:
            with Path(source).open("rb") as src:
                while chunk := src.read(CHUNK):
                    hasher.update(chunk)
                    out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return hasher.hexdigest()


def open_blob_store(settings: StoreSettings) -> BlobStore:
    """The backend the settings select: S3 when `blob_url` is set, else the local directory."""
    if settings.blob_url:
        from adapter_store.s3blobs import S3BlobStore

        return S3BlobStore.from_settings(settings)
    return LocalBlobStore(settings.blob_dir)
