"""Metrics a user can act on: per adapter name:version, capped, outcomes told apart."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import grpc
import pytest

from gateway.labels import AdapterLabels
from gateway.registry import AdapterRecord
from protos.lorapool.v1 import generation_pb2
from tests.serving.fakes import FakeWorker, GatewayThread, StaticRegistry, wait_until
from tests.serving.test_gateway import AUTH, generate, settings, stub

REQUESTS = "lorapool_gateway_adapter_requests_total"


def test_labels_keep_the_top_n_and_the_rest_as_other() -> None:
    evicted: list[str] = []
    labels = AdapterLabels(2, evicted.append)
    assert [labels.label(a) for a in ("a:1", "b:1", "c:1", "base")] == [
        "a:1",
        "b:1",
        "other",
        "base",
    ]
    assert [labels.label("a:1") for _ in range(3)] == ["a:1"] * 3
    got = [labels.label("c:1") for _ in range(3)]  # c:1 now has 4 requests, b:1 has 1
    assert got == ["other", "c:1", "c:1"] and evicted == ["b:1"]
    assert labels.top == {"a:1", "c:1"}


def test_labels_decay_so_the_table_stays_small() -> None:
    labels = AdapterLabels(1, lambda _: None, decay_every=100)
    for i in range(1000):
        labels.label(f"n{i}:1")
    assert len(labels._counts) <= 101


@pytest.fixture
def registry() -> StaticRegistry:
    return StaticRegistry(
        {"upper": AdapterRecord("upper", 3, "a" * 64), "lower": AdapterRecord("lower", 1, "b" * 64)}
    )


@pytest.fixture
def gateway(redis_url: str, registry: StaticRegistry) -> Iterator[GatewayThread]:
    gw = GatewayThread(settings(redis_url, top_adapters=1), registry)
    yield gw
    gw.stop()


@pytest.fixture
def worker(redis_url: str) -> Iterator[FakeWorker]:
    w = FakeWorker(redis_url)
    w.start()
    yield w
    w.halt()


def test_series_are_labelled_by_name_and_version_and_capped(
    gateway: GatewayThread, worker: FakeWorker
) -> None:
    generate(gateway, adapter="upper", text="abc")
    assert worker.seen[-1].adapter_ref == "upper:3"  # workers can label by name too
    generate(gateway, adapter="lower", text="de")  # past top_adapters=1: `other`
    assert worker.seen[-1].adapter_ref == "lower:1"
    generate(gateway, text="f")
    assert worker.seen[-1].adapter_ref == ""
    s = gateway.sample
    assert s(REQUESTS, adapter="upper:3", outcome="ok") == 1
    assert s(REQUESTS, adapter="other", outcome="ok") == 1
    assert s(REQUESTS, adapter="base", outcome="ok") == 1
    assert s("lorapool_gateway_output_tokens_total", adapter="upper:3") == 3
    assert s("lorapool_gateway_output_tokens_total", adapter="other") == 2
    assert s("lorapool_gateway_time_to_first_token_seconds_count", adapter="upper:3") == 1
    assert s("lorapool_gateway_inter_token_latency_seconds_count", adapter="upper:3") == 2
    assert s("lorapool_gateway_queue_wait_seconds_count", adapter="base") == 1


def test_deadline_and_cancel_are_counted_apart(gateway: GatewayThread, worker: FakeWorker) -> None:
    worker.delay_s = 0.05
    with pytest.raises(grpc.RpcError) as err:
        generate(gateway, timeout=3.0, adapter="upper", text="y" * 200, request_id="late")
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    call = stub(gateway).Generate(
        generation_pb2.GenerateRequest(adapter="upper", text="z" * 200, request_id="gone"),
        metadata=AUTH,
        timeout=120,
    )
    assert next(call).HasField("delta")
    call.cancel()
    s = gateway.sample

    # The client sees its deadline pass before the gateway's handler is cancelled and
    # counts it: wait for both outcomes (a busy CI host once asserted in between).
    def counted() -> bool:
        return (
            s(REQUESTS, adapter="upper:3", outcome="cancelled") == 1
            and s(REQUESTS, adapter="upper:3", outcome="deadline_exceeded") == 1
            and s("lorapool_gateway_errors_total", code="DEADLINE_EXCEEDED") == 1
            and s("lorapool_gateway_errors_total", code="CANCELLED") == 1
        )

    wait_until(counted, "the deadline and the cancel to be counted")
    assert s(REQUESTS, adapter="upper:3", outcome="ok") == 0


def test_failed_requests_are_logged_with_their_id(
    gateway: GatewayThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    with pytest.raises(grpc.RpcError):
        generate(gateway, adapter="nope", text="x", request_id="bad-1")
    assert "request 'bad-1' failed: NOT_FOUND" in caplog.text
    assert gateway.sample(REQUESTS, adapter="unresolved", outcome="not_found") == 1


def test_an_evicted_adapter_loses_its_series() -> None:
    from gateway.metrics import GatewayMetrics

    m = GatewayMetrics(top_adapters=1)
    a = m.adapters.label("a:1")
    m.outcome(a, "ok")
    m.output_tokens.labels(adapter=a).inc(5)
    assert m.registry.get_sample_value(REQUESTS, {"adapter": "a:1", "outcome": "ok"}) == 1
    labels = [m.adapters.label("b:1") for _ in range(3)]
    assert labels == ["other", "other", "b:1"]
    assert m.registry.get_sample_value(REQUESTS, {"adapter": "a:1", "outcome": "ok"}) is None
    tokens = "lorapool_gateway_output_tokens_total"
    assert m.registry.get_sample_value(tokens, {"adapter": "a:1"}) is None


def test_queue_depth_series_are_capped_with_the_rest_as_other() -> None:
    from prometheus_client import CollectorRegistry

    from gateway.metrics import GatewayMetrics

    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry, top_adapters=2)
    metrics.set_depths({f"{i:064x}": i for i in range(1, 1001)})  # 1000 queues
    series = {
        s.labels["adapter"]: s.value
        for family in registry.collect()
        if family.name == "lorapool_queue_depth"
        for s in family.samples
    }
    assert series == {f"{1000:064x}": 1000, f"{999:064x}": 999, "other": sum(range(1, 999))}
    metrics.set_depths({"a" * 64: 3})  # the queues drained: old series go
    assert registry.get_sample_value("lorapool_queue_depth", {"adapter": "other"}) is None
