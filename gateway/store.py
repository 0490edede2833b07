"""The registry the gateway uses in production: adapter_store's index and blobs, via threads.

SQLAlchemy is synchronous; every call runs on the registry's own bounded thread pool
(gateway/bounded.py), and the caller bounds it with a timeout. A stalled database holds at
most `max_threads` threads and `max_pending` calls; further calls are refused at once
(UNAVAILABLE) and counted. Store errors become the gateway's own exceptions here, nowhere
else.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from adapter_store import repository
from adapter_store.basemodel import BaseModelError, BaseModelSpec
from adapter_store.blobs import BlobStore
from adapter_store.errors import (
    AdapterNotFound,
    AdapterStoreError,
    AdapterValidationError,
    InvalidAdapterRef,
)
from adapter_store.models import Adapter
from adapter_store.upload import upload_adapter
from gateway.bounded import BoundedExecutor
from gateway.errors import (
    AdapterUnknown,
    AdapterUnservable,
    InvalidField,
    RegistryDown,
    UploadRejected,
)
from gateway.registry import AdapterRecord

T = TypeVar("T")

# Store exception → the gateway's; first match wins (subclasses before bases).
_TRANSLATE: list[tuple[type[Exception], Callable[[str], Exception]]] = [
    (AdapterNotFound, AdapterUnknown),
    (InvalidAdapterRef, lambda m: InvalidField("adapter", m)),
    (AdapterValidationError, UploadRejected),
    (BaseModelError, AdapterUnservable),
    (AdapterStoreError, RegistryDown),
    (SQLAlchemyError, lambda m: RegistryDown(f"registry unavailable: {m.splitlines()[0]}")),
]


def record(adapter: Adapter) -> AdapterRecord:
    return AdapterRecord(
        name=adapter.name,
        version=adapter.version,
        digest=adapter.digest,
        status=str(adapter.status),
        rank=adapter.rank,
        target_modules=tuple(adapter.target_modules),
        size_bytes=adapter.size_bytes,
        description=adapter.description,
    )


class StoreRegistry:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        blobs: BlobStore,
        base_model_dir: Path | None,
        max_rank: int,
        max_threads: int = 4,
        max_pending: int = 32,
    ) -> None:
        self._sessions = sessions
        self._blobs = blobs
        self._base_model_dir = base_model_dir
        self._max_rank = max_rank
        self.pool = BoundedExecutor("registry", max_threads, max_pending)

    async def resolve(self, ref: str) -> AdapterRecord:
        return await self._run(self._resolve, ref)

    async def list(self) -> list[AdapterRecord]:
        return await self._run(self._list)

    async def upload(self, directory: Path, name: str, description: str) -> AdapterRecord:
        return await self._run(self._upload, directory, name, description)

    async def delete(self, ref: str) -> AdapterRecord:
        return await self._run(self._delete, ref)

    def _resolve(self, ref: str) -> AdapterRecord:
        with self._sessions() as session:
            return record(repository.resolve(session, ref))

    def _list(self) -> builtins.list[AdapterRecord]:
        with self._sessions() as session:
            return [record(a) for a in repository.list_adapters(session)]

    def _delete(self, ref: str) -> AdapterRecord:
        with self._sessions() as session, session.begin():
            return record(repository.delete(session, ref))

    def _upload(self, directory: Path, name: str, description: str) -> AdapterRecord:
        if self._base_model_dir is None:
            raise AdapterUnservable("this gateway has no base model directory configured")
        base = BaseModelSpec.from_hf_dir(self._base_model_dir)
        adapter = upload_adapter(
            self._sessions,
            self._blobs,
            directory,
            name,
            description=description,
            base=base,
            max_rank=self._max_rank,
        )
        return record(adapter)

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        try:
            return await self.pool.run(fn, *args)
        except tuple(kind for kind, _ in _TRANSLATE) as exc:
            make = next(m for kind, m in _TRANSLATE if isinstance(exc, kind))
            raise make(str(exc)) from exc
