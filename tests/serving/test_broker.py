"""The Redis contract against a real (private) redis-server."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis
import redis.asyncio as aioredis

from broker import keys
from broker.queue import Claimed, Consumer, DuplicateRequest, Producer, QueueFull, choose_adapter
from broker.results import Outgoing, Publisher, Reader, StartState
from protos.lorapool.v1 import generation_pb2, queue_pb2
from tests.serving.fakes import wait_until


def job(request_id: str, digest: str = "", ttl_s: float = 60) -> queue_pb2.Job:
    now = int(time.time() * 1000)
    return queue_pb2.Job(
        request_id=request_id,
        request=generation_pb2.GenerateRequest(text="hi"),
        adapter_digest=digest,
        enqueued_ms=now,
        deadline_ms=now + int(ttl_s * 1000),
    )


def enqueue(url: str, *jobs: queue_pb2.Job, limits: keys.Limits | None = None) -> None:
    async def run() -> None:
        client = aioredis.Redis.from_url(url)
        producer = Producer(client, limits or keys.Limits())
        for j in jobs:
            await producer.enqueue(j, int(time.time() * 1000))
        await client.aclose()

    asyncio.run(run())


def test_choose_adapter_prefers_held_but_never_starves_the_oldest() -> None:
    ready = [("a", 1000.0), ("b", 1500.0), ("c", 1600.0)]
    assert choose_adapter(ready, {"b"}, now_ms=1100, max_wait_ms=500) == "b"
    assert choose_adapter(ready, {"b"}, now_ms=1600, max_wait_ms=500) == "a"
    assert choose_adapter(ready, set(), now_ms=1100, max_wait_ms=500) == "a"
    assert choose_adapter([], {"b"}, now_ms=0, max_wait_ms=500) is None


def test_affinity_tiers_prefer_the_device_then_the_host() -> None:
    ready = [("a", 1000.0), ("b", 1010.0), ("c", 1020.0), ("d", 1030.0)]
    tiers = ({"d"}, {"c", "b"}, {"a"})  # device, host, disk
    assert choose_adapter(ready, tiers, now_ms=1100, max_wait_ms=500) == "d"
    assert choose_adapter(ready, (set(), {"c", "b"}, set()), now_ms=1100, max_wait_ms=500) == "b"
    assert choose_adapter(ready, (set(), set(), set()), now_ms=1100, max_wait_ms=500) == "a"
    assert choose_adapter(ready, tiers, now_ms=1600, max_wait_ms=500) == "a"  # no starvation


def test_enqueue_claim_ack_keeps_ready_set_and_depth_exact(redis_url: str) -> None:
    enqueue(redis_url, job("r1", "d1"), job("r2", "d1"), job("r3", "d2"))
    client = redis.Redis.from_url(redis_url)
    assert client.zcard(keys.READY) == 2 and int(client.get(keys.TOTAL) or 0) == 3
    worker = Consumer(client, "w1", keys.Limits())
    first = worker.claim(held={"d2"}, count=8, max_wait_ms=60_000)
    assert [c.job.request_id for c in first] == ["r3"]
    assert client.zrange(keys.READY, 0, -1) == [b"d1"]
    rest = worker.claim(held=set(), count=1, max_wait_ms=60_000)
    assert [c.job.request_id for c in rest] == ["r1"]
    assert client.zcard(keys.READY) == 1  # r2 still waits
    for c in first + rest:
        worker.ack(c)
        worker.ack(c)  # idempotent
    assert int(client.get(keys.TOTAL) or 0) == 1
    assert client.xlen(keys.queue("d1")) == 1


def test_bounded_depth_and_duplicates(redis_url: str) -> None:
    limits = keys.Limits(max_depth_per_adapter=2, max_depth_total=3)
    enqueue(redis_url, job("a1", "a"), job("a2", "a"), limits=limits)
    with pytest.raises(QueueFull, match="adapter"):
        enqueue(redis_url, job("a3", "a"), limits=limits)
    enqueue(redis_url, job("b1", "b"), limits=limits)
    with pytest.raises(QueueFull, match="total"):
        enqueue(redis_url, job("c1", "c"), limits=limits)
    with pytest.raises(DuplicateRequest):
        enqueue(redis_url, job("a1", "z"), limits=limits)


def test_dead_worker_jobs_are_reclaimed_and_dead_lettered(redis_url: str) -> None:
    enqueue(redis_url, job("r1", "d1"))
    client = redis.Redis.from_url(redis_url)
    limits = keys.Limits(heartbeat_ttl_s=0.2, max_deliveries=2)
    dead = Consumer(client, "dead", limits)
    dead.heartbeat()
    assert len(dead.claim(set(), 4, 1000)) == 1
    alive = Consumer(client, "alive", limits)
    assert alive.reclaim() == []  # heartbeat still fresh
    wait_until(lambda: not client.exists(keys.heartbeat("dead")), "the heartbeat to expire")
    taken = alive.reclaim()
    assert [(c.job.request_id, c.deliveries) for c in taken] == [("r1", 2)]
    other = Consumer(client, "other", limits)
    assert other.reclaim() == []  # "alive" never heartbeated: only a full sweep sees it
    again: list[Claimed] = []

    def sweep() -> bool:  # the takeover guard needs the entry idle a moment first
        again.extend(other.reclaim(full=True))
        return bool(again)

    wait_until(sweep, "the full sweep to take the job over")
    assert [c.deliveries for c in again] == [3]
    other.dead_letter(again[0], "too many deliveries")
    assert client.xlen(keys.DEAD) == 1 and int(client.get(keys.TOTAL) or 0) == 0
    other.reclaim(full=True)  # tidies the now-empty queue
    assert client.smembers(keys.STREAMS) == set()


def test_results_exactly_one_terminal_and_stale_attempts_dropped(redis_url: str) -> None:
    enqueue(redis_url, job("r1"))
    client = redis.Redis.from_url(redis_url)
    pub = Publisher(client)
    first = pub.begin("r1")
    assert first.state is StartState.READY and first.attempt == 1
    second = pub.begin("r1")  # a takeover before any token went out
    delta = queue_pb2.Event(delta=generation_pb2.TokenDelta(seq=1, text="x", token_ids=[5]))
    final = queue_pb2.Event(final=generation_pb2.Final(completion_tokens=1))
    taken = pub.publish(
        [
            Outgoing("r1", first.attempt, delta, 60_000, tokens=1),  # stale
            Outgoing("r1", second.attempt, delta, 60_000, tokens=1),
            Outgoing("r1", second.attempt, final, 60_000),
            Outgoing("r1", second.attempt, final, 60_000),  # after the terminal event
        ]
    )
    assert taken == [False, True, True, False]
    assert pub.begin("r1").state is StartState.DONE
    assert 0 < client.pttl(keys.results("r1")) <= 60_000
    assert client.ttl(keys.meta("r1")) > 0

    async def read() -> list[str | None]:
        aclient = aioredis.Redis.from_url(redis_url)
        events = await Reader(aclient).read("r1", "0", block_ms=100)
        await aclient.aclose()
        return [e.WhichOneof("kind") for _, e in events]

    assert asyncio.run(read()) == ["delta", "final"]


def test_begin_reports_cancel_tokens_sent_and_lost(redis_url: str) -> None:
    enqueue(redis_url, job("c"), job("t"))
    client = redis.Redis.from_url(redis_url)
    pub = Publisher(client)

    async def cancel() -> bool:
        aclient = aioredis.Redis.from_url(redis_url)
        ok = await Producer(aclient, keys.Limits()).cancel("c")
        await aclient.aclose()
        return ok

    assert asyncio.run(cancel())
    assert pub.begin("c").state is StartState.CANCELLED
    assert pub.flags(["c", "t", "gone"]) == {"c": "cancel", "gone": "lost"}
    start = pub.begin("t")
    delta = queue_pb2.Event(delta=generation_pb2.TokenDelta(seq=1, text="x"))
    pub.publish([Outgoing("t", start.attempt, delta, 60_000, tokens=3)])
    again = pub.begin("t")
    assert again.state is StartState.TOKENS_SENT and again.sent == 3
    assert pub.begin("gone").state is StartState.LOST


def redis_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()  # type: ignore[misc]
    return int(seconds) * 1000 + int(micros) // 1000


def read_once(url: str, request_id: str) -> list[queue_pb2.Event]:
    async def run() -> list[queue_pb2.Event]:
        aclient = aioredis.Redis.from_url(url)
        events = await Reader(aclient).read(request_id, "0", block_ms=10)
        await aclient.aclose()
        return [e for _, e in events]

    return asyncio.run(run())


def test_flags_report_abandoned_by_redis_time_and_reads_refresh_it(redis_url: str) -> None:
    enqueue(redis_url, job("a"), job("c"))
    client = redis.Redis.from_url(redis_url)
    pub = Publisher(client, keys.Limits(abandon_after_s=5))
    assert pub.flags(["a", "c"]) == {}  # enqueue marks the reader seen
    client.hset(keys.meta("a"), "seen", redis_ms(client) - 6_000)  # a reader gone 6 s
    client.hset(keys.meta("c"), "seen", redis_ms(client) - 6_000)
    client.hset(keys.meta("c"), "cancel", 1)
    assert pub.flags(["a", "c", "gone"]) == {"a": "abandoned", "c": "cancel", "gone": "lost"}
    read_once(redis_url, "a")  # a gateway reads: seen again
    assert pub.flags(["a"]) == {}
    assert abs(int(client.hget(keys.meta("a"), "seen") or 0) - redis_ms(client)) < 60_000
    client.hset(keys.meta("a"), "seen", redis_ms(client) - 4_000)  # within the 5 s
    assert pub.flags(["a"]) == {}


def test_publish_stamps_the_attempt_on_every_event(redis_url: str) -> None:
    enqueue(redis_url, job("r"))
    client = redis.Redis.from_url(redis_url)
    pub = Publisher(client)
    start = pub.begin("r")
    delta = queue_pb2.Event(delta=generation_pb2.TokenDelta(seq=1, text="x"))
    pub.publish([Outgoing("r", start.attempt, delta, 60_000, tokens=1)])
    assert [e.attempt for e in read_once(redis_url, "r")] == [start.attempt] == [1]
    assert delta.attempt == 0  # the caller's event is left as it was


def test_live_workers_counts_live_heartbeats_in_one_call(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    for name in ("w1", "w2", "w3"):
        Consumer(client, name, keys.Limits()).heartbeat()
    Consumer(client, "w3", keys.Limits()).retire()  # registered, heartbeat gone

    async def count() -> int:
        aclient = aioredis.Redis.from_url(redis_url)
        n = await Producer(aclient, keys.Limits()).live_workers()
        await aclient.aclose()
        return n

    assert asyncio.run(count()) == 2
