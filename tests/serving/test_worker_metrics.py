"""Worker metrics a user can act on: per adapter by name and version, capped, outcomes that
say what happened, and a log line for every failed or reclaimed job."""

from __future__ import annotations

import logging

import pytest
import redis

from broker import keys
from tests.serving.test_worker_fakes import (
    cancel,
    ended,
    enqueue,
    outcome,
    sample,
    service,
    ticks,
    wait_until,
)
from worker.metrics import OTHER, TopAdapters, WorkerMetrics


def test_top_adapters_caps_labels_and_lets_a_busier_one_in() -> None:
    evicted: list[str] = []
    top = TopAdapters(2, evicted.append)
    assert [top.count(a) for a in ("a:1", "b:1", "c:1")] == ["a:1", "b:1", OTHER]
    assert top.label("c:1") == OTHER and top.count("base") == "base"  # base: outside the cap
    assert top.count("c:1") == OTHER  # 2 jobs: not more than twice the weakest's 1
    assert top.count("c:1") == "c:1" and evicted == ["a:1"]  # 3 > 2 × 1
    assert top.label("a:1") == OTHER and top.top == {"b:1", "c:1"}


def test_top_adapters_follow_recent_traffic() -> None:
    evicted: list[str] = []
    top = TopAdapters(1, evicted.append, decay_every=10)
    for _ in range(100):
        top.count("old:1")
    labels = [top.count("new:1") for _ in range(150)]  # without decay it would take 201
    assert labels[-1] == "new:1" and evicted == ["old:1"]


def test_series_of_an_adapter_that_leaves_the_top_are_removed() -> None:
    metrics = WorkerMetrics(top_adapters=1)
    metrics.admitted("a:1", 0.5)
    metrics.output_tokens("a:1", 4)
    metrics.job_ended("a:1", "stop")
    for _ in range(3):
        metrics.job_ended("b:1", "length")
    assert sample(metrics, "lorapool_worker_adapter_jobs_total", adapter="b:1", outcome="length")
    for name, labels in (
        ("lorapool_worker_adapter_jobs_total", {"outcome": "stop"}),
        ("lorapool_worker_adapter_output_tokens_total", {}),
        ("lorapool_worker_adapter_queue_seconds_count", {}),
    ):
        assert metrics.registry.get_sample_value(name, {"adapter": "a:1", **labels}) is None
    assert sample(metrics, "lorapool_worker_jobs_total", outcome="stop") == 1  # totals stay


def test_per_adapter_series_by_name_and_version(redis_url: str) -> None:
    enqueue(redis_url, "named", "d" * 64, max_tokens=3, ref="upper:3")
    enqueue(redis_url, "plain")
    enqueue(redis_url, "nameless", "e" * 64, max_tokens=2)  # from a gateway that sent no name
    metrics = WorkerMetrics()
    ticks(service(redis_url, metrics=metrics))
    for adapter, tokens, reason in (("upper:3", 3, "length"), ("base", 3, "length")):
        assert sample(
            metrics, "lorapool_worker_adapter_jobs_total", adapter=adapter, outcome=reason
        )
        assert sample(metrics, "lorapool_worker_adapter_output_tokens_total", adapter=adapter) == (
            tokens
        )
        for histogram in ("time_to_first_token", "queue"):
            name = f"lorapool_worker_adapter_{histogram}_seconds_count"
            assert sample(metrics, name, adapter=adapter) == 1
    assert (
        sample(
            metrics, "lorapool_worker_adapter_output_tokens_total", adapter="digest:eeeeeeeeeeee"
        )
        == 2
    )


def test_label_cardinality_is_capped(redis_url: str) -> None:
    for i in range(5):
        enqueue(redis_url, f"r{i}", f"{i}" * 64, max_tokens=1, ref=f"adapter{i}:1")
    metrics = WorkerMetrics(top_adapters=2)
    ticks(service(redis_url, metrics=metrics))
    [family] = [m for m in metrics.registry.collect() if m.name == "lorapool_worker_adapter_jobs"]
    labels = {s.labels["adapter"] for s in family.samples if s.name.endswith("_total")}
    assert len(labels) == 3 and OTHER in labels
    assert sum(s.value for s in family.samples if s.name.endswith("_total")) == 5


def test_a_deadline_is_a_deadline_and_a_cancel_a_cancel(redis_url: str) -> None:
    enqueue(redis_url, "slow", max_tokens=10_000)
    enqueue(redis_url, "gone", max_tokens=10_000)
    metrics = WorkerMetrics()
    svc = service(redis_url, metrics=metrics)
    ticks(svc, 2)
    svc.active["slow"].claimed.job.deadline_ms = 0  # its deadline passes while it runs...
    for rid in ("slow", "gone"):
        cancel(redis_url, rid)  # ...and the gateway cancels it, as it does at a deadline
    ticks(svc, 2)
    assert outcome(redis_url, "slow")[1] == keys.Code.DEADLINE_EXCEEDED
    assert outcome(redis_url, "gone")[1] == keys.Code.CANCELLED
    for reason in ("deadline_exceeded", "cancelled"):
        assert sample(metrics, "lorapool_worker_jobs_total", outcome=reason) == 1
        assert (
            sample(metrics, "lorapool_worker_adapter_jobs_total", adapter="base", outcome=reason)
            == 1
        )


def test_failed_and_reclaimed_jobs_are_logged_with_their_request_id(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    enqueue(redis_url, "doomed-7", "broken")
    enqueue(redis_url, "orphan-9")
    dead = service(redis_url, "dead", heartbeat_ttl_s=0.2)
    dead.consumer.heartbeat()
    dead.consumer.claim(set(), 1, 0)  # claims one job per adapter queue...
    dead.consumer.claim(set(), 1, 0)  # ...so both, then dies
    client = redis.Redis.from_url(redis_url)
    wait_until(lambda: not client.exists(keys.heartbeat("dead")))
    metrics = WorkerMetrics()
    alive = service(redis_url, "alive", metrics=metrics, heartbeat_ttl_s=0.2)
    with caplog.at_level(logging.INFO, logger="worker"):
        wait_until(lambda: all(ended(redis_url, r) for r in ("doomed-7", "orphan-9")), alive.tick)
    messages = [r.getMessage() for r in caplog.records]
    assert any("reclaimed job orphan-9" in m for m in messages)
    assert any("reclaimed job doomed-7" in m for m in messages)
    [failed] = [r for r in caplog.records if "doomed-7" in r.getMessage() and "ended" in r.msg]
    assert failed.levelno == logging.WARNING and "failed_precondition" in failed.getMessage()
    assert sample(metrics, "lorapool_worker_reclaimed_jobs_total") == 2
    assert outcome(redis_url, "orphan-9") == ("abc", 0)
