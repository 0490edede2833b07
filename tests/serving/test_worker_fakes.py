"""Test doubles for the worker's service loop: a scripted engine, scripted blobs and flags,
and helpers that enqueue jobs into a real Redis and read what the worker published.

(It holds no tests; the test_ prefix only keeps it beside the worker's service tests.)
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Set
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import redis

from adapter_store.tensorfile import TensorData, encode
from adapter_store.validation import CONFIG_METADATA_KEY
from broker import keys
from broker.queue import Consumer, Producer
from broker.results import Publisher
from protos.lorapool.v1 import generation_pb2, queue_pb2
from worker.blob_cache import AdapterBlobs, AdapterFetchError
from worker.engine import EngineStats
from worker.lora.manager import Tier
from worker.metrics import WorkerMetrics
from worker.sequence import FinishReason, SamplingParams, TokenEvent
from worker.service import ServiceSettings, WorkerService

DEADLINE_S = 60.0  # generous: a loaded 2-core machine must not turn a test red


@dataclass
class ScriptedEngine:
    """One token per request per step ('a', 'b', ...); max_tokens ends it.

    Prompt "bad" is refused (ValueError), prompt "boom" breaks add_request (RuntimeError);
    `fail_step` makes the next step raise, as a broken engine would."""

    live: dict[str, list[Any]] = field(default_factory=dict)
    cancelled: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    adapters: dict[str, Path] = field(default_factory=dict)
    pending: list[TokenEvent] = field(default_factory=list)
    prefetched: list[str] = field(default_factory=list)
    fail_step: bool = False

    def register_adapter(self, adapter_id: str, source: Path) -> None:
        self.adapters[adapter_id] = source

    def forget_adapter(self, adapter_id: str) -> None:
        self.adapters.pop(adapter_id, None)

    def prefetch_adapter(self, adapter_id: str) -> None:
        self.prefetched.append(adapter_id)

    def adapter_tier(self, adapter_id: str) -> Tier:
        return Tier.HOST if adapter_id in self.prefetched else Tier.ABSENT

    def add_request(
        self,
        request_id: str,
        prompt: Any,
        sampling: SamplingParams,
        adapter_id: str | None = None,
        speculative: Any = None,
    ) -> None:
        if prompt == "bad":
            raise ValueError("prompt is too long")
        if prompt == "boom":
            raise RuntimeError("tokenizer exploded")
        self.added.append(request_id)
        self.live[request_id] = [0, sampling.max_tokens]

    def cancel(self, request_id: str) -> None:
        if self.live.pop(request_id, None) is not None:
            self.cancelled.append(request_id)
            self.pending.append(TokenEvent(request_id, [], "", FinishReason.CANCELLED))

    def step(self) -> list[TokenEvent]:
        if self.fail_step:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
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

    def stats(self) -> EngineStats:
        numbers = {f.name: 0 for f in fields(EngineStats)}
        return EngineStats(**numbers | {"running": len(self.live), "free_pages": 100})


@dataclass
class FakeBlobs:
    """Blobs by digest: "broken" fails, "never" never arrives, a digest starting with "slow"
    arrives on its 7th ask; `evict` is what the next trim() evicts."""

    asks: Counter[str] = field(default_factory=Counter)
    trims: list[set[str]] = field(default_factory=list)  # every trim's in-use set
    evict: set[str] = field(default_factory=set)
    used_bytes: int = 0

    def get(self, digest: str) -> Path | None:
        self.asks[digest] += 1
        if digest == "broken":
            raise AdapterFetchError("adapter broken could not be fetched: digest mismatch")
        if digest == "never" or (digest.startswith("slow") and self.asks[digest] <= 6):
            return None
        return Path("/blobs") / digest

    def trim(self, in_use: Set[str]) -> set[str]:
        self.trims.append(set(in_use))
        evicted, self.evict = self.evict, set()
        return evicted


class ScriptedPublisher(Publisher):
    """The real publisher, with flags forced for some requests (e.g. "abandoned")."""

    def __init__(self, client: redis.Redis, forced: dict[str, str]) -> None:
        super().__init__(client)
        self.forced = forced

    def flags(self, request_ids: list[str]) -> dict[str, str]:
        out = super().flags(request_ids)
        out.update({rid: flag for rid, flag in self.forced.items() if rid in request_ids})
        return out


def blob(config: str | None = '{"peft_type": "LORA", "r": 2}', size: int = 64) -> bytes:
    """A registry-style blob: safetensors bytes, the adapter config in its metadata."""
    tensor = TensorData("F32", (size // 4,), bytes(size))
    metadata = {} if config is None else {CONFIG_METADATA_KEY: config}
    return encode({"lora": tensor}, metadata)


def enqueue(
    url: str,
    rid: str,
    digest: str = "",
    max_tokens: int = 3,
    text: str = "hi",
    ttl_s: float = 60,
    ref: str = "",
) -> None:
    now = int(time.time() * 1000)
    request = generation_pb2.GenerateRequest(
        text=text, sampling=generation_pb2.SamplingParams(max_tokens=max_tokens)
    )
    job = queue_pb2.Job(
        request_id=rid,
        request=request,
        adapter_digest=digest,
        adapter_ref=ref,
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


def cancel(url: str, rid: str) -> None:
    async def run() -> None:
        client = keys.async_client(url, 2)
        await Producer(client, keys.Limits()).cancel(rid)
        await client.aclose()

    asyncio.run(run())


def service(
    url: str,
    name: str = "w",
    engine: ScriptedEngine | None = None,
    blobs: AdapterBlobs | None = None,
    publisher: Publisher | None = None,
    metrics: WorkerMetrics | None = None,
    **limits: Any,
) -> WorkerService:
    client = redis.Redis.from_url(url)
    settings = ServiceSettings(
        flags_interval_s=0, reclaim_interval_s=0, idle_sleep_s=0, drain_s=0.5
    )
    return WorkerService(
        engine or ScriptedEngine(),  # type: ignore[arg-type]
        Consumer(client, name, keys.Limits(**limits)),
        publisher or Publisher(client),
        blobs or FakeBlobs(),
        settings,
        metrics or WorkerMetrics(),
    )


def events(url: str, rid: str) -> list[queue_pb2.Event]:
    entries = redis.Redis.from_url(url).xrange(keys.results(rid))
    return [keys.decode_event(fields[b"ev"]) for _, fields in entries]


def ended(url: str, rid: str) -> bool:
    return any(e.WhichOneof("kind") != "delta" for e in events(url, rid))


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


def wait_until(
    done: Callable[[], bool], step: Callable[[], None] = lambda: time.sleep(0.01)
) -> None:
    """Call `step` until `done()`, for up to DEADLINE_S."""
    deadline = time.monotonic() + DEADLINE_S
    while not done():
        assert time.monotonic() < deadline, "gave up waiting"
        step()


def sample(metrics: WorkerMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0
