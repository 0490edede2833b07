"""A stalled registry holds a bounded number of threads; past the bound, UNAVAILABLE at once."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import grpc
import pytest
from sqlalchemy.exc import SQLAlchemyError

from adapter_store.blobs import LocalBlobStore
from gateway.bounded import PoolSaturated
from gateway.store import StoreRegistry
from protos.lorapool.v1 import generation_pb2
from tests.serving.fakes import GatewayThread, wait_until
from tests.serving.test_gateway import AUTH, settings, stub


class StalledDatabase:
    """A session factory whose sessions block until released, then fail."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.inside = 0
        self.most = 0

    def __call__(self) -> StalledDatabase:
        return self

    def __enter__(self) -> None:
        with self.lock:
            self.inside += 1
            self.most = max(self.most, self.inside)
        self.release.wait(120)
        with self.lock:
            self.inside -= 1
        raise SQLAlchemyError("the database stalled")

    def __exit__(self, *exc: object) -> None:
        return None


def registry(db: StalledDatabase, tmp: Path, threads: int, pending: int) -> StoreRegistry:
    return StoreRegistry(
        db,  # type: ignore[arg-type]
        LocalBlobStore(tmp),
        None,
        64,
        max_threads=threads,
        max_pending=pending,
    )


def test_stalled_calls_hold_at_most_the_pool_and_the_rest_are_refused(tmp_path: Path) -> None:
    db = StalledDatabase()
    reg = registry(db, tmp_path, threads=2, pending=3)

    async def main() -> None:
        calls = [asyncio.create_task(reg.resolve(f"a{i}")) for i in range(3)]
        await asyncio.to_thread(wait_until, lambda: db.inside == 2, "two stalled threads")
        with pytest.raises(PoolSaturated):
            await reg.resolve("refused")
        assert reg.pool.saturated_total == 1 and reg.pool.in_flight == 3
        for call in calls:  # callers give up (as wait_for does); the threads stay stuck
            call.cancel()
        await asyncio.wait(calls)
        assert reg.pool.in_flight == 2  # the queued call never ran; two threads still stall
        db.release.set()
        await asyncio.to_thread(wait_until, lambda: reg.pool.in_flight == 0, "threads back")

    asyncio.run(main())
    assert db.most == 2


def test_gateway_answers_unavailable_and_counts_saturation(redis_url: str, tmp_path: Path) -> None:
    db = StalledDatabase()
    gw = GatewayThread(
        settings(redis_url, registry_cache_s=0.0), registry(db, tmp_path, threads=1, pending=1)
    )
    try:
        request = generation_pb2.GenerateRequest(adapter="x", text="hi")
        for _ in range(2):  # the first stalls past the registry timeout, the second is refused
            with pytest.raises(grpc.RpcError) as err:
                list(stub(gw).Generate(request, metadata=AUTH, timeout=60))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "registry busy" in (err.value.details() or "")
        assert gw.sample("lorapool_gateway_registry_pool_saturated_total") == 1
        assert gw.sample("lorapool_gateway_registry_pool_in_flight") == 1
    finally:
        db.release.set()
        gw.stop()
