"""What the gateway needs from the adapter registry, with a short TTL cache for lookups."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from protos.lorapool.v1 import generation_pb2


@dataclass(frozen=True)
class AdapterRecord:
    name: str
    version: int
    digest: str
    status: str = "READY"
    rank: int = 0
    target_modules: tuple[str, ...] = ()
    size_bytes: int = 0
    description: str = ""

    def to_proto(self) -> generation_pb2.AdapterInfo:
        return generation_pb2.AdapterInfo(
            name=self.name,
            version=self.version,
            digest=self.digest,
            status=self.status,
            rank=self.rank,
            target_modules=list(self.target_modules),
            size_bytes=self.size_bytes,
            description=self.description,
        )


class Registry(Protocol):
    """Async registry calls; they raise gateway.errors exceptions (AdapterUnknown, ...)."""

    async def resolve(self, ref: str) -> AdapterRecord: ...

    async def list(self) -> list[AdapterRecord]: ...

    async def upload(self, directory: Path, name: str, description: str) -> AdapterRecord: ...

    async def delete(self, ref: str) -> AdapterRecord: ...


@dataclass
class CachedResolver:
    """Resolves refs through a registry, remembering answers for `ttl_s` seconds."""

    registry: Registry
    ttl_s: float = 5.0
    timeout_s: float = 2.0
    _cache: dict[str, tuple[float, AdapterRecord]] = field(default_factory=dict)

    async def resolve(self, ref: str) -> AdapterRecord:
        now = time.monotonic()
        hit = self._cache.get(ref)
        if hit is not None and now - hit[0] < self.ttl_s:
            return hit[1]
        record = await asyncio.wait_for(self.registry.resolve(ref), self.timeout_s)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[ref] = (now, record)
        return record

    def forget(self) -> None:
        self._cache.clear()
