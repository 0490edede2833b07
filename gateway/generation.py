"""The Generation service: validate → resolve the adapter → enqueue → relay result events."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import NoReturn

import grpc

from broker.queue import Producer
from broker.results import Reader
from gateway import errors
from gateway.errors import DeadlinePassed, QueueDown, RequestLost, WorkerFailure
from gateway.metrics import GatewayMetrics
from gateway.probe import RedisProbe
from gateway.registry import CachedResolver, Registry
from gateway.validation import RequestLimits, validate
from protos.lorapool.v1 import generation_pb2, generation_pb2_grpc, queue_pb2

log = logging.getLogger(__name__)

_CANCEL_ERRORS: tuple[type[BaseException], ...] = (asyncio.CancelledError, *errors.MAPPED)
READ_BLOCK_MS = 500  # one XREAD waits at most this long; then the request's state is checked


@dataclass(frozen=True)
class GenerationDeps:
    producer: Producer
    reader: Reader
    resolver: CachedResolver
    registry: Registry
    probe: RedisProbe
    metrics: GatewayMetrics
    limits: RequestLimits
    max_request_s: float
    cancel_timeout_s: float = 1.0


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, deps: GenerationDeps) -> None:
        self._d = deps

    async def Generate(  # noqa: N802 (gRPC method name)
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        self._d.metrics.requests.labels(method="Generate").inc()
        received = time.monotonic()
        try:
            job = await self._enqueue(request, context)
        except errors.MAPPED as exc:
            await self._fail(context, exc)
        async for response in self._relay(job, received, context):
            yield response

    async def ListAdapters(  # noqa: N802
        self, request: generation_pb2.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> generation_pb2.ListAdaptersResponse:
        self._d.metrics.requests.labels(method="ListAdapters").inc()
        try:
            records = await asyncio.wait_for(self._d.registry.list(), self._d.resolver.timeout_s)
        except errors.MAPPED as exc:
            await self._fail(context, exc)
        return generation_pb2.ListAdaptersResponse(adapters=[r.to_proto() for r in records])

    async def _enqueue(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> queue_pb2.Job:
        validate(request, self._d.limits)
        if not self._d.probe.up:
            raise QueueDown("queue unavailable (Redis unreachable): retry later")
        digest = ""
        if request.adapter:
            digest = (await self._d.resolver.resolve(request.adapter)).digest
        now_ms = int(time.time() * 1000)
        remaining = context.time_remaining()
        budget_s = (
            self._d.max_request_s if remaining is None else min(remaining, self._d.max_request_s)
        )
        job = queue_pb2.Job(
            request_id=request.request_id or uuid.uuid4().hex,
            request=request,
            adapter_digest=digest,
            enqueued_ms=now_ms,
            deadline_ms=now_ms + int(budget_s * 1000),
        )
        if not job.request.sampling.HasField("max_tokens"):
            job.request.sampling.max_tokens = self._d.limits.default_max_tokens
        await self._d.producer.enqueue(job, now_ms)
        return job

    async def _relay(
        self, job: queue_pb2.Job, received: float, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        finished = False
        first_token: float | None = None
        last = received
        try:
            async for event in self._events(job):
                kind = event.WhichOneof("kind")
                now = time.monotonic()
                if kind == "delta":
                    first_token = first_token or now
                    self._observe_delta(event.delta, now, last, received)
                    last = now
                    yield generation_pb2.GenerateResponse(delta=event.delta)
                elif kind == "final":
                    finished = True
                    final = event.final
                    final.request_id = job.request_id
                    final.time_to_first_token_s = (first_token or now) - received
                    yield generation_pb2.GenerateResponse(final=final)
                    return
                else:
                    finished = True
                    raise WorkerFailure(event.failure.code, event.failure.message)
        except errors.MAPPED as exc:
            await self._fail(context, exc)
        finally:
            if not finished:
                await self._cancel(job.request_id)

    async def _events(self, job: queue_pb2.Job) -> AsyncIterator[queue_pb2.Event]:
        after = "0"
        while True:
            batch = await self._d.reader.read(job.request_id, after, READ_BLOCK_MS)
            if not batch:
                if time.time() * 1000 > job.deadline_ms + READ_BLOCK_MS:
                    raise DeadlinePassed("deadline exceeded")
                if not await self._d.producer.exists(job.request_id):
                    raise RequestLost("the queue lost this request (Redis restarted?): retry")
            for entry_id, event in batch:
                after = entry_id
                yield event

    def _observe_delta(
        self, delta: generation_pb2.TokenDelta, now: float, last: float, received: float
    ) -> None:
        m = self._d.metrics
        m.output_tokens.inc(len(delta.token_ids))
        if delta.seq == 1:
            m.ttft.observe(now - received)
        else:
            m.itl.observe(now - last)

    async def _cancel(self, request_id: str) -> None:
        """Tell the worker to stop (client cancelled, deadline passed, or an error)."""
        task = asyncio.ensure_future(self._d.producer.cancel(request_id))
        try:
            await asyncio.wait_for(asyncio.shield(task), self._d.cancel_timeout_s)
        except _CANCEL_ERRORS as exc:
            log.debug("cancel of %s not confirmed: %r", request_id, exc)

    async def _fail(self, context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
        code, _ = errors.status_of(exc)
        self._d.metrics.errors.labels(code=code.name).inc()
        await errors.abort(context, exc)
