"""The worker's service loop against real Redis, with a scripted engine."""

from __future__ import annotations

import threading

import redis

from broker import keys
from tests.serving.test_worker_fakes import (
    FakeBlobs,
    ScriptedEngine,
    ScriptedPublisher,
    cancel,
    ended,
    enqueue,
    events,
    outcome,
    sample,
    service,
    ticks,
    wait_until,
)
from worker.metrics import WorkerMetrics


def test_jobs_stream_in_order_and_are_acked(redis_url: str) -> None:
    enqueue(redis_url, "r1", "d1")
    enqueue(redis_url, "r2", "d1", max_tokens=5)
    enqueue(redis_url, "r3")
    svc = service(redis_url)
    ticks(svc)
    assert outcome(redis_url, "r1") == ("abc", 0) and outcome(redis_url, "r2") == ("abcde", 0)
    assert [e.delta.seq for e in events(redis_url, "r2")[:-1]] == [1, 2, 3, 4, 5]
    final = events(redis_url, "r2")[-1].final
    assert final.completion_tokens == 5 and final.finish_reason == 2  # FINISH_REASON_LENGTH
    assert int(redis.Redis.from_url(redis_url).get(keys.TOTAL) or 0) == 0
    assert svc.feed.held == {"d1"}


def test_cancelled_expired_and_invalid_jobs_never_run(redis_url: str) -> None:
    enqueue(redis_url, "cancel-1")
    enqueue(redis_url, "late", ttl_s=-1)
    enqueue(redis_url, "bad", text="bad")
    enqueue(redis_url, "broken", "broken")
    engine = ScriptedEngine()
    ticks(service(redis_url, engine=engine))
    assert engine.added == []
    assert outcome(redis_url, "cancel-1") == ("", keys.Code.CANCELLED)
    assert outcome(redis_url, "late") == ("", keys.Code.DEADLINE_EXCEEDED)
    assert outcome(redis_url, "bad") == ("", keys.Code.INVALID_ARGUMENT)
    assert outcome(redis_url, "broken") == ("", keys.Code.FAILED_PRECONDITION)


def test_cancel_while_running_stops_the_engine(redis_url: str) -> None:
    enqueue(redis_url, "run", max_tokens=50)
    engine = ScriptedEngine()
    svc = service(redis_url, engine=engine)
    ticks(svc, 3)
    cancel(redis_url, "run")
    ticks(svc, 2)
    assert engine.cancelled == ["run"]
    text, code = outcome(redis_url, "run")
    assert code == keys.Code.CANCELLED and 2 <= len(text) <= 4


def test_an_abandoned_job_stops_like_a_cancel(redis_url: str) -> None:
    """Nobody reads its results (the gateway's cancel was lost): cancelled in the engine at
    once, ended CANCELLED, acked, and counted as abandoned, not as lost."""
    enqueue(redis_url, "orphan", max_tokens=10_000)
    enqueue(redis_url, "parked", "never")
    enqueue(redis_url, "other", max_tokens=5)
    engine, metrics = ScriptedEngine(), WorkerMetrics()
    publisher = ScriptedPublisher(redis.Redis.from_url(redis_url), {})
    svc = service(redis_url, engine=engine, publisher=publisher, metrics=metrics)
    ticks(svc, 3)
    publisher.forced.update(orphan="abandoned", parked="abandoned")
    ticks(svc, 3)
    assert engine.cancelled == ["orphan"] and "parked" not in engine.added
    assert outcome(redis_url, "orphan")[1] == keys.Code.CANCELLED
    assert outcome(redis_url, "parked") == ("", keys.Code.CANCELLED)
    ticks(svc, 3)
    assert outcome(redis_url, "other") == ("abcde", 0)
    assert sample(metrics, "lorapool_worker_jobs_total", outcome="abandoned") == 2
    assert sample(metrics, "lorapool_worker_jobs_total", outcome="lost") == 0
    assert int(redis.Redis.from_url(redis_url).get(keys.TOTAL) or 0) == 0  # all acked


def _heartbeat_gone(url: str, worker: str) -> bool:
    return not redis.Redis.from_url(url).exists(keys.heartbeat(worker))


def test_dead_worker_jobs_retry_or_end_retryable(redis_url: str) -> None:
    enqueue(redis_url, "streamed", max_tokens=50)
    dead = service(redis_url, "dead", heartbeat_ttl_s=0.2)
    dead.consumer.heartbeat()
    ticks(dead, 3)  # claims and streams 3 tokens ('streamed'), then dies
    enqueue(redis_url, "fresh", "d2")
    dead.tick()  # claims 'fresh' and streams one token of it too
    enqueue(redis_url, "quiet")
    dead.consumer.claim(set(), 1, 0)  # claimed but never started
    wait_until(lambda: _heartbeat_gone(redis_url, "dead"))
    alive = service(redis_url, "alive", heartbeat_ttl_s=0.2)
    rids = ("streamed", "fresh", "quiet")
    wait_until(lambda: all(ended(redis_url, r) for r in rids), alive.tick)
    text, code = outcome(redis_url, "streamed")
    assert (
        code == keys.Code.UNAVAILABLE
        and "after 4 tokens" in events(redis_url, "streamed")[-1].failure.message
    )
    assert outcome(redis_url, "quiet") == ("abc", 0)  # transparent retry
    assert int(redis.Redis.from_url(redis_url).get(keys.TOTAL) or 0) == 0


def test_too_many_deliveries_go_to_the_dead_letter_stream(redis_url: str) -> None:
    enqueue(redis_url, "poison")
    first = service(redis_url, "w0", heartbeat_ttl_s=0.1, max_deliveries=2)
    first.consumer.heartbeat()
    first._claim()  # delivery 1, then it "crashes"
    wait_until(lambda: _heartbeat_gone(redis_url, "w0"))
    second = service(redis_url, "w1", heartbeat_ttl_s=0.1, max_deliveries=2)
    second.consumer.heartbeat()
    wait_until(lambda: bool(second.consumer.reclaim(full=True)))  # delivery 2, "crashes" too
    wait_until(lambda: _heartbeat_gone(redis_url, "w1"))
    final = service(redis_url, "last", heartbeat_ttl_s=0.1, max_deliveries=2)
    wait_until(lambda: ended(redis_url, "poison"), final.tick)  # delivery 3: too many
    assert outcome(redis_url, "poison")[1] == keys.Code.INTERNAL
    assert redis.Redis.from_url(redis_url).xlen(keys.DEAD) == 1


def test_sigterm_drains_then_hands_back(redis_url: str) -> None:
    enqueue(redis_url, "short", max_tokens=2)
    enqueue(redis_url, "long", max_tokens=1_000_000)
    svc = service(redis_url)
    stop = threading.Event()
    # daemon, and stopped whatever happens: a failing test must not keep pytest alive
    runner = threading.Thread(target=svc.run, args=(stop,), daemon=True)
    runner.start()
    try:
        wait_until(lambda: ended(redis_url, "short") and bool(events(redis_url, "long")))
    finally:
        stop.set()
    runner.join(60)
    assert not runner.is_alive()
    assert outcome(redis_url, "short") == ("ab", 0)
    _, code = outcome(redis_url, "long")
    assert code == keys.Code.UNAVAILABLE
    assert not redis.Redis.from_url(redis_url).exists(keys.heartbeat("w"))


def test_a_cold_adapter_does_not_stall_other_jobs(redis_url: str) -> None:
    enqueue(redis_url, "cold", "slow")
    enqueue(redis_url, "warm")
    svc = service(redis_url)  # FakeBlobs: "slow" arrives on its 7th ask
    ticks(svc, 4)
    assert outcome(redis_url, "warm") == ("abc", 0) and not events(redis_url, "cold")
    ticks(svc, 8)
    assert outcome(redis_url, "cold") == ("abc", 0)


def test_cancel_while_the_adapter_loads(redis_url: str) -> None:
    enqueue(redis_url, "parked", "never")
    engine = ScriptedEngine()
    svc = service(redis_url, engine=engine)
    ticks(svc, 2)
    cancel(redis_url, "parked")
    ticks(svc, 2)
    assert outcome(redis_url, "parked") == ("", keys.Code.CANCELLED) and engine.added == []


def test_blobs_in_use_are_pinned_and_evicted_ones_no_longer_held(redis_url: str) -> None:
    enqueue(redis_url, "running", "d1", max_tokens=10_000)
    enqueue(redis_url, "waiting", "never")
    blobs = FakeBlobs()
    svc = service(redis_url, blobs=blobs)
    ticks(svc, 3)
    assert blobs.trims[-1] == {"d1", "never"}  # the active job's blob and the parked one's
    cancel(redis_url, "running")
    ticks(svc, 2)
    assert "d1" not in blobs.trims[-1] and svc.feed.held == {"d1"}
    blobs.evict = {"d1"}
    ticks(svc, 1)
    assert svc.feed.held == set()  # evicted: fetched (and registered) again when needed
    enqueue(redis_url, "again", "d1")
    ticks(svc, 5)
    assert outcome(redis_url, "again") == ("abc", 0) and blobs.asks["d1"] == 2
