"""No live worker is visible: Generation health, and UNAVAILABLE instead of a silent wait."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker import keys
from gateway.registry import AdapterRecord
from protos.lorapool.v1 import generation_pb2
from tests.serving.fakes import FakeWorker, GatewayThread, StaticRegistry, wait_until
from tests.serving.test_gateway import AUTH, settings, stub

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def registry() -> StaticRegistry:
    return StaticRegistry({"upper": AdapterRecord("upper", 1, "a" * 64)})


def health(gw: GatewayThread, service: str) -> int:
    check = health_pb2_grpc.HealthStub(grpc.insecure_channel(gw.target)).Check
    return int(check(health_pb2.HealthCheckRequest(service=service), timeout=10).status)


@pytest.fixture
def worker(redis_url: str) -> Iterator[FakeWorker]:
    w = FakeWorker(redis_url)
    yield w
    w.halt()


def test_generation_health_follows_live_workers(
    redis_url: str, registry: StaticRegistry, worker: FakeWorker
) -> None:
    gw = GatewayThread(settings(redis_url), registry)
    try:
        assert health(gw, "lorapool.v1.Generation") == NOT_SERVING  # Redis up, no worker
        assert health(gw, "") == SERVING  # overall: Redis only
        worker.start()
        wait_until(lambda: health(gw, "lorapool.v1.Generation") == SERVING, "SERVING")
        worker.die()
        wait_until(lambda: health(gw, "lorapool.v1.Generation") == NOT_SERVING, "NOT_SERVING")
        assert health(gw, "") == SERVING
        assert gw.sample("lorapool_gateway_live_workers") == 0
    finally:
        gw.stop()


def test_generate_without_live_worker_past_the_grace_is_unavailable_at_once(
    redis_url: str, registry: StaticRegistry
) -> None:
    gw = GatewayThread(settings(redis_url, no_worker_grace_s=0.0), registry)
    try:
        request = generation_pb2.GenerateRequest(adapter="upper", text="hi", request_id="n-1")
        with pytest.raises(grpc.RpcError) as err:
            # Without the check this waits for the 60 s deadline: DEADLINE_EXCEEDED.
            list(stub(gw).Generate(request, metadata=AUTH, timeout=60))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no live worker" in (err.value.details() or "")
        assert redis.Redis.from_url(redis_url).get(keys.TOTAL) is None  # nothing enqueued
    finally:
        gw.stop()


def test_waiting_request_ends_unavailable_when_the_last_worker_dies(
    redis_url: str, registry: StaticRegistry
) -> None:
    w = FakeWorker(redis_url, claim=False)  # alive, but never claims: the request waits
    w.start()
    gw = GatewayThread(settings(redis_url, no_worker_grace_s=1.0), registry)
    try:
        wait_until(lambda: health(gw, "lorapool.v1.Generation") == SERVING, "a live worker")
        request = generation_pb2.GenerateRequest(text="hello", request_id="w-1")
        call = stub(gw).Generate(request, metadata=AUTH, timeout=120)
        client = redis.Redis.from_url(redis_url)
        wait_until(lambda: client.exists(keys.meta("w-1")), "the request to be queued")
        w.die()
        with pytest.raises(grpc.RpcError) as err:
            list(call)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no live worker" in (err.value.details() or "")
        wait_until(lambda: client.hget(keys.meta("w-1"), "cancel") == b"1", "the cancel flag")
    finally:
        w.halt()
        gw.stop()
