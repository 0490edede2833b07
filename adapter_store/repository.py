"""Queries and writes on the adapter index. Functions take a Session; the caller commits."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from adapter_store.errors import AdapterNotFound, InvalidAdapterRef
from adapter_store.models import Adapter, AdapterName, AdapterStatus

__all__ = [
    "AdapterNotFound",
    "InvalidAdapterRef",
    "delete",
    "find_ready_with_digest",
    "list_adapters",
    "live_digests",
    "lock_name",
    "next_version",
    "parse_ref",
    "resolve",
    "validate_name",
]

# Full matches only (`\A…\Z`, checked with fullmatch): `$` would let a trailing newline pass.
NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
VERSION_RE = re.compile(r"\A[1-9][0-9]{0,8}\Z")
# Dialect name → its INSERT construct that supports ON CONFLICT DO NOTHING.
UPSERT_INSERTS: dict[str, Callable[..., Any]] = {
    "postgresql": postgresql.insert,
    "sqlite": sqlite.insert,
}


def validate_name(name: str) -> str:
    """Return `name` if it is a valid adapter name, else raise InvalidAdapterRef."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidAdapterRef(
            f"invalid adapter name {name!r}: use 1-128 of A-Z a-z 0-9 . _ - "
            "starting with a letter or digit"
        )
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """`name` → (name, None); `name:version` → (name, version)."""
    if not isinstance(ref, str):
        raise InvalidAdapterRef(f"invalid adapter reference {ref!r}")
    name, sep, version = ref.partition(":")
    validate_name(name)
    if not sep:
        return name, None
    if not VERSION_RE.fullmatch(version):
        raise InvalidAdapterRef(f"invalid adapter version in {ref!r}: a positive integer")
    return name, int(version)


def resolve(session: Session, ref: str) -> Adapter:
    """The READY adapter `ref` names: `name` (its latest READY version) or `name:version`."""
    name, version = parse_ref(ref)
    query = select(Adapter).where(Adapter.name == name, Adapter.status == AdapterStatus.READY)
    if version is None:
        query = query.order_by(Adapter.version.desc()).limit(1)
    else:
        query = query.where(Adapter.version == version)
    adapter = session.scalars(query).first()
    if adapter is None:
        raise AdapterNotFound(f"no adapter {ref!r}")
    return adapter


def list_adapters(session: Session, include_deleted: bool = False) -> list[Adapter]:
    """All adapters (READY, or every status), by name then version."""
    query = select(Adapter).order_by(Adapter.name, Adapter.version)
    if not include_deleted:
        query = query.where(Adapter.status == AdapterStatus.READY)
    return list(session.scalars(query))


def delete(session: Session, ref: str) -> Adapter:
    """Soft-delete the version `ref` resolves to (a bare name: its latest READY version).

    The row stays (status DELETED) so versions are never reused; the blob is
    removed by gc once no live row references it.
    """
    adapter = resolve(session, ref)
    adapter.status = AdapterStatus.DELETED
    adapter.deleted_at = datetime.now(UTC)
    session.flush()
    return adapter


def lock_name(session: Session, name: str) -> None:
    """Create the name's row if needed and lock it until the transaction ends.

    Serializes uploads of one name so versions are numbered without gaps or
    unique violations (PostgreSQL: row lock; SQLite: the write lock).
    """
    insert = UPSERT_INSERTS[session.get_bind().dialect.name]
    session.execute(
        insert(AdapterName)
        .values(name=validate_name(name), created_at=datetime.now(UTC))
        .on_conflict_do_nothing()
    )
    session.execute(select(AdapterName.name).where(AdapterName.name == name).with_for_update())


def next_version(session: Session, name: str) -> int:
    """One more than the highest version ever given to `name` (deleted ones included)."""
    highest = session.scalar(select(func.max(Adapter.version)).where(Adapter.name == name))
    return (highest or 0) + 1


def find_ready_with_digest(session: Session, name: str, digest: str) -> Adapter | None:
    """The latest READY version of `name` whose blob is `digest`, if any."""
    query = (
        select(Adapter)
        .where(
            Adapter.name == name,
            Adapter.digest == digest,
            Adapter.status == AdapterStatus.READY,
        )
        .order_by(Adapter.version.desc())
        .limit(1)
    )
    return session.scalars(query).first()


def live_digests(session: Session) -> set[str]:
    """Digests referenced by any row not DELETED (blobs gc must keep)."""
    query = select(Adapter.digest).where(Adapter.status != AdapterStatus.DELETED).distinct()
    return set(session.scalars(query))
