"""Test doubles: a static registry, a scripted worker, a gateway on a background loop, and a
TCP proxy that can cut the gateway off from Redis."""

from __future__ import annotations

import asyncio
import gc
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    """Heartbeats like a worker; once `claiming` is set, claims jobs and streams the prompt
    back one character per token, `delay_s` apart."""

    def __init__(
        self, url: str, name: str = "fake", delay_s: float = 0.01, claim: bool = True
    ) -> None:
        super().__init__(daemon=True)
        self.client = redis.Redis.from_url(url)
        self.consumer = Consumer(self.client, name, keys.Limits())
        self.publisher = Publisher(self.client)
        self.delay_s = delay_s
        self.stopping = threading.Event()
        self.claiming = threading.Event()
        if claim:
            self.claiming.set()
        self.beating = threading.Event()  # cleared: heartbeats stop (the worker "dies")
        self.beating.set()
        self.seen: list[queue_pb2.Job] = []
        self.stopped_early: list[str] = []
        self.finished: list[str] = []

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.step()
            except redis.RedisError:
                time.sleep(0.05)  # Redis is down: try again, as a worker would

    def step(self) -> None:
        if self.beating.is_set():
            self.consumer.heartbeat()
        claimed = self.consumer.claim(set(), 1, 0) if self.claiming.is_set() else []
        if not claimed:
            time.sleep(0.005)
        for c in claimed:
            self.seen.append(c.job)
            self.serve(c.job)
            self.consumer.ack(c)

    def die(self) -> None:
        """Stop heartbeating and claiming, and drop the heartbeat key at once."""
        self.beating.clear()
        self.claiming.clear()
        self.consumer.retire()

    def serve(self, job: queue_pb2.Job) -> None:
        start = self.publisher.begin(job.request_id)
        if start.state is not StartState.READY:
            return
        text = job.request.text.upper()[: job.request.sampling.max_tokens]
        for seq, ch in enumerate(text, 1):
            if self.beating.is_set():
                self.consumer.heartbeat()
            if (
                self.stopping.is_set()
                or self.publisher.flags([job.request_id])
                or time.time() * 1000 > job.deadline_ms
            ):
                self.stopped_early.append(job.request_id)
                return
            delta = generation_pb2.TokenDelta(seq=seq, text=ch, token_ids=[ord(ch)])
            self.publish(job, start.attempt, queue_pb2.Event(delta=delta), 1)
            time.sleep(self.delay_s)
        final = generation_pb2.Final(
            finish_reason=generation_pb2.FINISH_REASON_LENGTH, completion_tokens=len(text)
        )
        self.publish(job, start.attempt, queue_pb2.Event(final=final), 0)
        self.finished.append(job.request_id)

    def publish(self, job: queue_pb2.Job, attempt: int, event: queue_pb2.Event, n: int) -> None:
        self.publisher.publish([Outgoing(job.request_id, attempt, event, 60_000, n)])

    def halt(self) -> None:
        """Stop and wait, so no late heartbeat outlives the test."""
        self.stopping.set()
        if self.ident is not None:
            self.join(30)


class GatewayThread:
    """A real gateway (grpc.aio) on its own event loop thread, on a free port.

    Errors the loop reports (e.g. "Task exception was never retrieved") are kept in
    `loop_errors`; `unretrieved()` collects garbage first, so such reports are made.
    """

    def __init__(self, settings: GatewaySettings, registry: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop_errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda _loop, ctx: self.loop_errors.append(ctx))
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.metrics = GatewayMetrics(top_adapters=settings.top_adapters)
        self.gateway: Gateway = self.call(self._start(settings, registry))
        self.target = f"127.0.0.1:{self.gateway.port}"

    async def _start(self, settings: GatewaySettings, registry: Any) -> Gateway:
        gateway = build(settings, registry, self.metrics)
        await gateway.start()
        return gateway

    def call(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def unretrieved(self) -> list[str]:
        gc.collect()
        return [str(ctx.get("message")) for ctx in self.loop_errors]

    def stop(self) -> None:
        self.call(self.gateway.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class RedisProxy(threading.Thread):
    """A TCP proxy to Redis. `cut()` closes every connection and refuses new ones (as
    closed at once) until `restore()`: a Redis outage seen by one client only."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.up = threading.Event()
        self.up.set()
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def run(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up.is_set():
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self.lock:
                self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            s.close()

    def cut(self) -> None:
        self.up.clear()
        with self.lock:
            for s in self.sockets:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self.sockets.clear()

    def restore(self) -> None:
        self.up.set()

    def close(self) -> None:
        self.cut()
        self.listener.close()


def wait_until(predicate: Any, what: str, timeout_s: float = 60.0) -> None:
    """Poll `predicate` until it is true; fail after a generous `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.02)
