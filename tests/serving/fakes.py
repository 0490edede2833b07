"""Test doubles: a static registry, a scripted worker, and a gateway on a background loop."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from broker import keys
from broker.queue import Consumer
from broker.results import Outgoing, Publisher, StartState
from gateway.errors import AdapterUnknown
from gateway.metrics import GatewayMetrics
from gateway.registry import AdapterRecord
from gateway.server import Gateway, build
from gateway.settings import GatewaySettings
from protos.lorapool.v1 import generation_pb2, queue_pb2


@dataclass
class StaticRegistry:
    adapters: dict[str, AdapterRecord] = field(default_factory=dict)
    down: bool = False
    lookups: int = 0

    async def resolve(self, ref: str) -> AdapterRecord:
        self.lookups += 1
        if self.down:
            await asyncio.sleep(60)
        name = ref.split(":")[0]
        if name not in self.adapters:
            raise AdapterUnknown(f"adapter {ref!r} not found")
        return self.adapters[name]

    async def list(self) -> list[AdapterRecord]:
        return list(self.adapters.values())

    async def upload(self, directory: Path, name: str, description: str) -> AdapterRecord:
        record = AdapterRecord(name, 1, "d" * 64, description=description)
        self.adapters[name] = record
        return record

    async def delete(self, ref: str) -> AdapterRecord:
        name = ref.split(":")[0]
        if name not in self.adapters:
            raise AdapterUnknown(ref)
        return self.adapters.pop(name)


class FakeWorker(threading.Thread):
    """Claims jobs and streams the prompt back one character per token, `delay_s` apart."""

    def __init__(self, url: str, name: str = "fake", delay_s: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.client = redis.Redis.from_url(url)
        self.consumer = Consumer(self.client, name, keys.Limits())
        self.publisher = Publisher(self.client)
        self.delay_s = delay_s
        self.stopping = threading.Event()
        self.seen: list[queue_pb2.Job] = []
        self.stopped_early: list[str] = []

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.step()
            except redis.RedisError:
                time.sleep(0.05)  # Redis is down: try again, as a worker would

    def step(self) -> None:
        claimed = self.consumer.claim(set(), 1, 0)
        if not claimed:
            time.sleep(0.005)
        for c in claimed:
            self.seen.append(c.job)
            self.serve(c.job)
            self.consumer.ack(c)

    def serve(self, job: queue_pb2.Job) -> None:
        start = self.publisher.begin(job.request_id)
        if start.state is not StartState.READY:
            return
        text = job.request.text.upper()[: job.request.sampling.max_tokens]
        for seq, ch in enumerate(text, 1):
            if self.publisher.flags([job.request_id]) or time.time() * 1000 > job.deadline_ms:
                self.stopped_early.append(job.request_id)
                return
            delta = generation_pb2.TokenDelta(seq=seq, text=ch, token_ids=[ord(ch)])
            self.publish(job, start.attempt, queue_pb2.Event(delta=delta), 1)
            time.sleep(self.delay_s)
        final = generation_pb2.Final(
            finish_reason=generation_pb2.FINISH_REASON_LENGTH, completion_tokens=len(text)
        )
        self.publish(job, start.attempt, queue_pb2.Event(final=final), 0)

    def publish(self, job: queue_pb2.Job, attempt: int, event: queue_pb2.Event, n: int) -> None:
        self.publisher.publish([Outgoing(job.request_id, attempt, event, 60_000, n)])


class GatewayThread:
    """A real gateway (grpc.aio) on its own event loop thread, on a free port."""

    def __init__(self, settings: GatewaySettings, registry: StaticRegistry) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.metrics = GatewayMetrics()
        self.gateway: Gateway = self.call(self._start(settings, registry))
        self.target = f"127.0.0.1:{self.gateway.port}"

    async def _start(self, settings: GatewaySettings, registry: StaticRegistry) -> Gateway:
        gateway = build(settings, registry, self.metrics)  # type: ignore[arg-type]
        await gateway.start()
        return gateway

    def call(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def stop(self) -> None:
        self.call(self.gateway.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
