"""Repository functions on both databases, in rolled-back transactions."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from adapter_store import repository
from adapter_store.basemodel import BaseModelSpec
from adapter_store.blobs import LocalBlobStore
from adapter_store.errors import AdapterNotFound, InvalidAdapterRef
from adapter_store.models import Adapter, AdapterStatus
from adapter_store.upload import upload_adapter
from tests.adapter_store.builders import write_lora


def upload(
    factory: sessionmaker[Session],
    blobs: LocalBlobStore,
    base: BaseModelSpec,
    path: Path,
    name: str,
    seed: int,
) -> int:
    directory = write_lora(path / f"{name}-{seed}", base, seed=seed)
    return upload_adapter(factory, blobs, directory, name, base=base, max_rank=16).version


def mine(adapters: list[Adapter]) -> list[Adapter]:
    """Other tests commit rows to the shared database; keep this test's names."""
    return [a for a in adapters if a.name in ("chat", "other")]


@pytest.mark.parametrize(
    "ref",
    [
        "../../etc/passwd",
        "",
        ":1",
        "a:",
        "a:0",
        "a:-1",
        "a:1:2",
        "a b",
        ".hidden",
        "x" * 129,
        "a:01",
    ],
)
def test_invalid_refs(ref: str, session_factory: sessionmaker[Session]) -> None:
    with session_factory() as session, pytest.raises(InvalidAdapterRef):
        repository.resolve(session, ref)


def test_versions_resolve_list_and_soft_delete(
    session_factory: sessionmaker[Session],
    blobs: LocalBlobStore,
    tiny_base: BaseModelSpec,
    tmp_path: Path,
) -> None:
    assert [upload(session_factory, blobs, tiny_base, tmp_path, "chat", s) for s in (1, 2, 3)] == [
        1,
        2,
        3,
    ]
    upload(session_factory, blobs, tiny_base, tmp_path, "other", 1)
    with session_factory() as session, session.begin():
        assert repository.resolve(session, "chat").version == 3
        assert repository.resolve(session, "chat:1").version == 1
        assert [(a.name, a.version) for a in mine(repository.list_adapters(session))] == [
            ("chat", 1),
            ("chat", 2),
            ("chat", 3),
            ("other", 1),
        ]
        deleted = repository.delete(session, "chat")
        assert (deleted.version, deleted.status) == (3, AdapterStatus.DELETED)
        assert deleted.deleted_at is not None
        assert repository.resolve(session, "chat").version == 2
        with pytest.raises(AdapterNotFound):
            repository.resolve(session, "chat:3")
        repository.delete(session, "chat:1")
        assert len(mine(repository.list_adapters(session))) == 2
        assert len(mine(repository.list_adapters(session, include_deleted=True))) == 4
        with pytest.raises(AdapterNotFound):
            repository.resolve(session, "missing")
    # Versions are never reused after a delete.
    assert upload(session_factory, blobs, tiny_base, tmp_path, "chat", 4) == 4


def test_row_records_the_adapter(
    session_factory: sessionmaker[Session],
    blobs: LocalBlobStore,
    tiny_base: BaseModelSpec,
    tmp_path: Path,
) -> None:
    directory = write_lora(tmp_path / "a", tiny_base, r=8, targets=("q_proj", "down_proj"))
    adapter = upload_adapter(
        session_factory, blobs, directory, "rec", description="d", base=tiny_base, max_rank=16
    )
    with session_factory() as session:
        row = repository.resolve(session, "rec:1")
        assert row.to_dict() | {"created_at": None} == adapter.to_dict() | {"created_at": None}
    assert (row.rank, row.max_module_rank, row.alpha) == (8, 8, 16.0)
    assert row.target_modules == ["down_proj", "q_proj"]
    assert (row.dtype, row.adapter_type, row.description) == ("float32", "lora", "d")
    assert row.base_fingerprint == tiny_base.fingerprint
    assert row.size_bytes == len(blobs.get(row.digest))


def test_identical_reupload_is_idempotent(
    session_factory: sessionmaker[Session],
    blobs: LocalBlobStore,
    tiny_base: BaseModelSpec,
    tmp_path: Path,
) -> None:
    """Policy: same name + same normalized bytes → the existing READY version, unchanged."""
    first = upload(session_factory, blobs, tiny_base, tmp_path / "1", "same", 7)
    again = upload(session_factory, blobs, tiny_base, tmp_path / "2", "same", 7)
    assert first == again == 1
    assert upload(session_factory, blobs, tiny_base, tmp_path, "same-elsewhere", 7) == 1
    with session_factory() as session, session.begin():
        repository.delete(session, "same:1")
    assert upload(session_factory, blobs, tiny_base, tmp_path / "3", "same", 7) == 2
    assert len(list(blobs.list_digests())) == 1
