"""The worker's service loop against real Redis, with a scripted engine."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from broker import keys
from broker.queue import Consumer, Producer
from broker.results import Publisher
from protos.lorapool.v1 import generation_pb2, queue_pb2
from worker.metrics import WorkerMetrics
from worker.sequence import FinishReason, SamplingParams, TokenEvent
from worker.service import AdapterFetchError, ServiceSettings, WorkerService


@dataclass
class Stats:
    running: int
    free_pages: int


@dataclass
class ScriptedEngine:
    """One token per request per step ('a', 'b', ...); max_tokens ends it."""

    live: dict[str, list[Any]] = field(default_factory=dict)
    cancelled: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    adapters: dict[str, Path] = field(default_factory=dict)
    pending: list[TokenEvent] = field(default_factory=list)

    def register_adapter(self, adapter_id: str, source: Path) -> None:
        self.adapters[adapter_id] = source

    def add_request(
        self, request_id: str, prompt: Any, sampling: SamplingParams, adapter_id: str | None = None
    ) -> None:
        if prompt == "bad":
            raise ValueError("prompt is too long")
        self.added.append(request_id)
        self.live[request_id] = [0, sampling.max_tokens]

    def cancel(self, request_id: str) -> None:
        if self.live.pop(request_id, None) is not None:
            self.cancelled.append(request_id)
            self.pending.append(TokenEvent(request_id, [], "", FinishReason.CANCELLED))

    def step(self) -> list[TokenEvent]:
        events, self.pending = self.pending, []
        for rid, state in list(self.live.items()):
            state[0] += 1
            done = state[0] >= state[1]
            reason = FinishReason.LENGTH if done else None
            events.append(
                TokenEvent(rid, [state[0]], chr(96 + state[0]), reason, None, 3, state[0])
            )
            if done:
                del self.live[rid]
        return events

    def has_unfinished(self) -> bool:
        return bool(self.live or self.pending)

    def stats(self) -> Stats:
        return Stats(len(self.live), 100 - len(self.live))


def enqueue(
    url: str, rid: str, digest: str = "", max_tokens: int = 3, text: str = "hi", ttl_s: float = 60
) -> None:
    now = int(time.time() * 1000)
    request = generation_pb2.GenerateRequest(
        text=text, sampling=generation_pb2.SamplingParams(max_tokens=max_tokens)
    )
    job = queue_pb2.Job(
        request_id=rid,
        request=request,
        adapter_digest=digest,
        enqueued_ms=now,
        deadline_ms=now + int(ttl_s * 1000),
    )

    async def run() -> None:
        client = keys.async_client(url, 2)
        producer = Producer(client, keys.Limits())
        await producer.enqueue(job, now)
        if rid.startswith("cancel"):
            await producer.cancel(rid)
        await client.aclose()

    asyncio.run(run())


def service(
    url: str, name: str = "w", engine: ScriptedEngine | None = None, **limits: Any
) -> WorkerService:
    client = redis.Redis.from_url(url)
    fetched: list[str] = []

    def fetch(digest: str) -> Path:
        if digest == "broken":
            raise AdapterFetchError("adapter broken could not be fetched: digest mismatch")
        fetched.append(digest)
        return Path("/blobs") / digest

    settings = ServiceSettings(
        flags_interval_s=0, reclaim_interval_s=0, idle_sleep_s=0, drain_s=0.5
    )
    return WorkerService(
        engine or ScriptedEngine(),
        Consumer(client, name, keys.Limits(**limits)),
        Publisher(client),
        fetch,
        settings,
        WorkerMetrics(),
    )


def events(url: str, rid: str) -> list[queue_pb2.Event]:
    entries = redis.Redis.from_url(url).xrange(keys.results(rid))
    return [keys.decode_event(fields[b"ev"]) for _, fields in entries]


def outcome(url: str, rid: str) -> tuple[str, int]:
    """The text streamed and the terminal code (0: finished normally)."""
    evs = events(url, rid)
    text = "".join(e.delta.text for e in evs if e.HasField("delta"))
    terminal = [e for e in evs if e.WhichOneof("kind") != "delta"]
    assert len(terminal) == 1, evs
    return text, terminal[0].failure.code if terminal[0].HasField("failure") else 0


def ticks(svc: WorkerService, n: int = 10) -> None:
    for _ in range(n):
        svc.tick()


def test_jobs_stream_in_order_and_are_acked(redis_url: str) -> None:
    enqueue(redis_url, "r1", "d1")
    enqueue(redis_url, "r2", "d1", max_tokens=5)
    enqueue(redis_url, "r3")
    svc = service(redis_url)
    ticks(svc)
    assert outcome(redis_url, "r1") == ("abc", 0) and outcome(redis_url, "r2") == ("abcde", 0)
    assert [e.delta.seq for e in events(redis_url, "r2")[:-1]] == [1, 2, 3, 4, 5]
    final = events(redis_url, "r2")[-1].final
    assert (
        final.completion_tokens == 5 and final.finish_reason == generation_pb2.FINISH_REASON_LENGTH
    )
    assert int(redis.Redis.from_url(redis_url).get(keys.TOTAL) or 0) == 0
    assert svc.held == {keys.BASE, "d1"}


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

    async def cancel() -> None:
        client = keys.async_client(redis_url, 2)
        await Producer(client, keys.Limits()).cancel("run")
        await client.aclose()

    asyncio.run(cancel())
    ticks(svc, 2)
    assert engine.cancelled == ["run"]
    text, code = outcome(redis_url, "run")
    assert code == keys.Code.CANCELLED and 2 <= len(text) <= 4


def test_dead_worker_jobs_retry_or_end_retryable(redis_url: str) -> None:
    enqueue(redis_url, "streamed", max_tokens=50)
    dead = service(redis_url, "dead", heartbeat_ttl_s=0.2)
    dead.consumer.heartbeat()
    ticks(dead, 3)  # claims and streams 3 tokens ('streamed'), then dies
    enqueue(redis_url, "fresh", "d2")
    dead.tick()  # claims 'fresh' and streams one token of it too
    enqueue(redis_url, "quiet")
    dead.consumer.claim(set(), 1, 0)  # claimed but never started
    time.sleep(0.3)
    alive = service(redis_url, "alive", heartbeat_ttl_s=0.2)
    ticks(alive)
    text, code = outcome(redis_url, "streamed")
    assert (
        code == keys.Code.UNAVAILABLE
        and "after 4 tokens" in events(redis_url, "streamed")[-1].failure.message
    )
    assert outcome(redis_url, "quiet") == ("abc", 0)  # transparent retry
    assert int(redis.Redis.from_url(redis_url).get(keys.TOTAL) or 0) == 0


def test_too_many_deliveries_go_to_the_dead_letter_stream(redis_url: str) -> None:
    enqueue(redis_url, "poison")
    for i in range(4):
        w = service(redis_url, f"w{i}", heartbeat_ttl_s=0.1, max_deliveries=2)
        w._claim() if i == 0 else w.consumer.reclaim(full=True)  # each "crashes" after claiming
        time.sleep(0.15)
        if events(redis_url, "poison"):
            break
    final = service(redis_url, "last", heartbeat_ttl_s=0.1, max_deliveries=2)
    ticks(final, 2)
    assert outcome(redis_url, "poison")[1] == keys.Code.INTERNAL
    assert redis.Redis.from_url(redis_url).xlen(keys.DEAD) == 1


def test_sigterm_drains_then_hands_back(redis_url: str) -> None:
    enqueue(redis_url, "short", max_tokens=2)
    enqueue(redis_url, "long", max_tokens=10_000)
    svc = service(redis_url)
    stop = threading.Event()
    runner = threading.Thread(target=svc.run, args=(stop,))
    runner.start()
    time.sleep(0.3)
    stop.set()
    runner.join(10)
    assert not runner.is_alive()
    assert outcome(redis_url, "short") == ("ab", 0)
    _, code = outcome(redis_url, "long")
    assert code == keys.Code.UNAVAILABLE
    assert not redis.Redis.from_url(redis_url).exists(keys.heartbeat("w"))


def test_a_cold_adapter_does_not_stall_other_jobs(redis_url: str) -> None:
    enqueue(redis_url, "cold", "slow")
    enqueue(redis_url, "warm")
    svc = service(redis_url)
    calls = {"n": 0}

    def slow_fetch(digest: str) -> Path | None:
        calls["n"] += 1
        return Path("/blobs/slow") if calls["n"] > 6 else None

    svc.fetch = slow_fetch
    ticks(svc, 4)
    assert outcome(redis_url, "warm") == ("abc", 0) and not events(redis_url, "cold")
    ticks(svc, 8)
    assert outcome(redis_url, "cold") == ("abc", 0)


def test_cancel_while_the_adapter_loads(redis_url: str) -> None:
    enqueue(redis_url, "parked", "never")
    engine = ScriptedEngine()
    svc = service(redis_url, engine=engine)
    svc.fetch = lambda digest: None
    ticks(svc, 2)

    async def cancel() -> None:
        client = keys.async_client(redis_url, 2)
        await Producer(client, keys.Limits()).cancel("parked")
        await client.aclose()

    asyncio.run(cancel())
    ticks(svc, 2)
    assert outcome(redis_url, "parked") == ("", keys.Code.CANCELLED) and engine.added == []


def test_blob_cache_fetches_in_the_background(tmp_path: Path) -> None:
    from adapter_store.blobs import LocalBlobStore
    from worker.__main__ import BlobCache

    store = LocalBlobStore(tmp_path / "store")
    digest = store.put(b"adapter bytes")
    seen: list[float] = []
    cache = BlobCache(store, tmp_path / "cache", seen.append)
    deadline = time.monotonic() + 5
    while (path := cache(digest)) is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert path.read_bytes() == b"adapter bytes" and len(seen) == 1
    assert cache(digest) == path  # cached: no second fetch
    for bad in ("../../etc/passwd", "0" * 64):
        with pytest.raises(AdapterFetchError):
            while cache(bad) is None:
                time.sleep(0.01)
