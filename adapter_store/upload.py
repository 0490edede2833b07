"""The upload flow: validate → encode → put the blob → insert the READY row, in that order.

Idempotency policy: uploading bytes that normalize to the blob of an existing
READY version of the same name returns that version unchanged (no new version,
description untouched). The same bytes under another name, or after the
matching version was deleted, get a new version sharing the blob.

Crash safety: the blob is written before the row; a crash in between leaves
an unreferenced blob (never a READY row without bytes), which gc removes after
its grace period. The put refreshes the blob's age, so gc cannot collect a blob
an upload is about to reference unless the commit lags the put by more than
the grace period.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from adapter_store import repository
from adapter_store.basemodel import BaseModelSpec
from adapter_store.blobs import BlobStore
from adapter_store.models import Adapter, AdapterStatus
from adapter_store.validation import ValidatedAdapter, validate_adapter_dir

# Stages reported to the progress callback, in order.
STAGES = ("validate", "encode", "store", "commit")
Progress = Callable[[str], None]


def _no_progress(_stage: str) -> None:
    return None


def upload_adapter(
    session_factory: sessionmaker[Session],
    blobs: BlobStore,
    directory: Path,
    name: str,
    *,
    description: str = "",
    base: BaseModelSpec,
    max_rank: int,
    progress: Progress | None = None,
) -> Adapter:
    """Validate and store the adapter in `directory` as the next version of `name`."""
    report = progress or _no_progress
    repository.validate_name(name)
    report("validate")
    validated = validate_adapter_dir(Path(directory), base, max_rank)
    report("encode")
    data = validated.encode()
    report("store")
    digest = blobs.put(data)
    report("commit")
    with session_factory() as session, session.begin():
        return register(session, name, validated, digest, len(data), base, description)


def register(
    session: Session,
    name: str,
    validated: ValidatedAdapter,
    digest: str,
    size_bytes: int,
    base: BaseModelSpec,
    description: str,
) -> Adapter:
    """Insert the READY row for a stored blob (or return the identical existing one)."""
    repository.lock_name(session, name)
    existing = repository.find_ready_with_digest(session, name, digest)
    if existing is not None:
        return existing
    config = validated.config
    trained_on = validated.parsed.base_quantization
    adapter = Adapter(
        name=name,
        version=repository.next_version(session, name),
        status=AdapterStatus.READY,
        base_fingerprint=base.fingerprint,
        base_architecture=base.architecture,
        base_quantization=None if trained_on is None else trained_on.method,
        adapter_type=validated.adapter_type,
        rank=config["r"],
        max_module_rank=max(validated.module_ranks.values()),
        rank_pattern=config["rank_pattern"],
        alpha=config["lora_alpha"],
        alpha_pattern=config["alpha_pattern"],
        use_rslora=config["use_rslora"],
        target_modules=config["target_modules"],
        dtype=validated.dtype,
        size_bytes=size_bytes,
        digest=digest,
        description=description,
    )
    session.add(adapter)
    session.flush()
    return adapter
