"""A cancel must survive a Redis blip, and no background task may fail unnoticed."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
import redis

from broker import keys
from gateway.registry import AdapterRecord
from protos.lorapool.v1 import generation_pb2, generation_pb2_grpc
from tests.serving.fakes import FakeWorker, GatewayThread, RedisProxy, StaticRegistry, wait_until
from tests.serving.redis_proc import RedisProcess
from tests.serving.test_gateway import AUTH, settings


@pytest.fixture
def proxy(redis_url: str, redis_proc: RedisProcess) -> Iterator[RedisProxy]:
    p = RedisProxy(redis_proc.port)
    p.start()
    yield p
    p.close()


def test_cancel_lost_in_a_redis_blip_reaches_the_worker_after_recovery(
    redis_url: str, proxy: RedisProxy
) -> None:
    """The gateway reaches Redis through a proxy; the worker directly. Cutting the proxy is
    a Redis outage for the gateway only: the client fails, the gateway's cancel fails, and
    the worker keeps generating until the retried cancel lands after the proxy is back."""
    worker = FakeWorker(redis_url, delay_s=0.2)  # 300 characters: a minute of tokens
    worker.start()
    gw = GatewayThread(
        settings(proxy.url, no_worker_grace_s=600.0),
        StaticRegistry({"u": AdapterRecord("u", 1, "")}),
    )
    try:
        stub = generation_pb2_grpc.GenerationStub(grpc.insecure_channel(gw.target))
        request = generation_pb2.GenerateRequest(text="x" * 300, request_id="blip")
        call = stub.Generate(request, metadata=AUTH, timeout=120)
        assert next(call).HasField("delta")
        proxy.cut()
        with pytest.raises(grpc.RpcError) as err:
            list(call)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        wait_until(lambda: gw.sample("lorapool_gateway_cancel_retries_total") >= 1, "a retry")
        direct = redis.Redis.from_url(redis_url)
        assert direct.hget(keys.meta("blip"), "cancel") is None  # not delivered yet
        proxy.restore()
        wait_until(lambda: direct.hget(keys.meta("blip"), "cancel") == b"1", "the cancel")
        wait_until(lambda: "blip" in worker.stopped_early, "the worker to stop")
        assert "blip" not in worker.finished
        wait_until(lambda: len(gw.gateway.tasks) == 1, "the cancel task to end")  # the probe
        assert gw.unretrieved() == []
        assert gw.sample("lorapool_gateway_background_task_errors_total") == 0
    finally:
        worker.halt()
        gw.stop()


def test_background_task_failures_are_retrieved_logged_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import asyncio
    import gc

    from gateway.tasks import BackgroundTasks

    errors: list[str] = []
    failures: list[int] = []

    async def boom() -> None:
        raise RuntimeError("boom")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _l, ctx: errors.append(str(ctx.get("message"))))
        tasks = BackgroundTasks(on_error=lambda: failures.append(1))
        task = tasks.spawn(boom(), "boom")
        await asyncio.wait({task})
        del task
        gc.collect()
        assert len(tasks) == 0
        await tasks.close(1.0)

    asyncio.run(main())
    gc.collect()
    assert errors == [] and failures == [1]
    assert "background task boom failed" in caplog.text
