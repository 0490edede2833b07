"""Garbage collection of blobs that no live adapter row references."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from adapter_store import repository
from adapter_store.blobs import BlobStore, LocalBlobStore
from adapter_store.errors import BlobNotFound

DEFAULT_GRACE_S = 3600.0


@dataclass(frozen=True)
class GcReport:
    deleted: list[str]
    kept_young: list[str]
    temp_files_removed: int


def collect_garbage(
    session_factory: sessionmaker[Session], blobs: BlobStore, grace_s: float = DEFAULT_GRACE_S
) -> GcReport:
    """Delete blobs unreferenced by any non-DELETED row and untouched for `grace_s` seconds.

    Ages are read before the index is queried, so a blob put by an upload that
    commits after the query is young (a put refreshes the age) and is kept.
    """
    aged: dict[str, float] = {}
    for digest in list(blobs.list_digests()):
        try:
            aged[digest] = blobs.age(digest)
        except BlobNotFound:
            continue
    with session_factory() as session:
        live = repository.live_digests(session)
    deleted, young = [], []
    for digest, age in sorted(aged.items()):
        if digest in live:
            continue
        if age <= grace_s:
            young.append(digest)
            continue
        blobs.delete(digest)
        deleted.append(digest)
    temp_removed = blobs.collect_temp_files(grace_s) if isinstance(blobs, LocalBlobStore) else 0
    return GcReport(deleted=deleted, kept_young=young, temp_files_removed=temp_removed)
