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
from gateway import errors
from gateway.errors import NoLiveWorker, QueueDown, WorkerFailure
from gateway.labels import BASE, UNRESOLVED, adapter_label
from gateway.metrics import GatewayMetrics
from gateway.probe import RedisProbe
from gateway.registry import CachedResolver, Registry
from gateway.relay import NO_LIVE_WORKER, Relay
from gateway.tasks import BackgroundTasks, retry_until
from gateway.validation import RequestLimits, validate
from protos.lorapool.v1 import generation_pb2, generation_pb2_grpc, queue_pb2

log = logging.getLogger(__name__)

# A client whose deadline passes cancels the call itself, and that cancel reaches us before
# our copy of the deadline (which started when the call arrived, later than the client's
# clock) runs out: a call ended with less than this left counts as a deadline.
DEADLINE_SLACK_S = 1.0


@dataclass(frozen=True)
class GenerationDeps:
    producer: Producer
    relay: Relay
    resolver: CachedResolver
    registry: Registry
    probe: RedisProbe
    metrics: GatewayMetrics
    tasks: BackgroundTasks
    limits: RequestLimits
    max_request_s: float
    no_worker_grace_s: float = 15.0
    result_ttl_s: float = 120.0  # how long the request's keys outlive its deadline
    cancel_timeout_s: float = 1.0


@dataclass
class Call:
    """One Generate call, as the metrics and logs see it."""

    request_id: str
    received: float  # monotonic
    label: str = UNRESOLVED  # the adapter's metric label, once resolved
    job: queue_pb2.Job | None = None
    finished: bool = False  # a terminal event arrived: nothing to cancel
    first_token: float | None = None
    last: float = 0.0


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, deps: GenerationDeps) -> None:
        self._d = deps

    async def Generate(  # noqa: N802 (gRPC method name)
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        self._d.metrics.requests.labels(method="Generate").inc()
        call = Call(request.request_id or uuid.uuid4().hex, time.monotonic())
        try:
            call.job = await self._enqueue(request, call, context)
            async for response in self._relay(call.job, call):
                yield response
            self._d.metrics.outcome(call.label, "ok")
        except errors.MAPPED as exc:
            await self._fail(context, call, exc)
        except (asyncio.CancelledError, GeneratorExit):
            self._ended_by_client(call, context)
            raise
        finally:
            if call.job is not None and not call.finished:
                self._cancel(call.job)

    async def ListAdapters(  # noqa: N802
        self, request: generation_pb2.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> generation_pb2.ListAdaptersResponse:
        self._d.metrics.requests.labels(method="ListAdapters").inc()
        try:
            records = await asyncio.wait_for(self._d.registry.list(), self._d.resolver.timeout_s)
        except errors.MAPPED as exc:
            await self._fail(context, None, exc)
        return generation_pb2.ListAdaptersResponse(adapters=[r.to_proto() for r in records])

    async def _enqueue(
        self,
        request: generation_pb2.GenerateRequest,
        call: Call,
        context: grpc.aio.ServicerContext,
    ) -> queue_pb2.Job:
        validate(request, self._d.limits)
        if not self._d.probe.up:
            raise QueueDown("queue unavailable (Redis unreachable): retry later")
        digest, ref = "", ""
        if request.adapter:
            record = await self._d.resolver.resolve(request.adapter)
            digest, ref = record.digest, adapter_label(record.name, record.version)
        call.label = self._d.metrics.adapters.label(ref or BASE)
        if self._d.probe.workerless(self._d.no_worker_grace_s):
            raise NoLiveWorker(NO_LIVE_WORKER)
        now_ms = int(time.time() * 1000)
        remaining = context.time_remaining()
        budget_s = (
            self._d.max_request_s if remaining is None else min(remaining, self._d.max_request_s)
        )
        job = queue_pb2.Job(
            request_id=call.request_id,
            request=request,
            adapter_digest=digest,
            adapter_ref=ref,
            enqueued_ms=now_ms,
            deadline_ms=now_ms + int(budget_s * 1000),
        )
        if not job.request.sampling.HasField("max_tokens"):
            job.request.sampling.max_tokens = self._d.limits.default_max_tokens
        await self._d.producer.enqueue(job, now_ms)
        return job

    async def _relay(
        self, job: queue_pb2.Job, call: Call
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        async for event in self._d.relay.events(job):
            kind = event.WhichOneof("kind")
            if kind == "delta":
                self._observe_delta(event.delta, call)
                yield generation_pb2.GenerateResponse(delta=event.delta)
                continue
            call.finished = True
            if kind == "failure":
                raise WorkerFailure(event.failure.code, event.failure.message)
            final = event.final
            final.request_id = job.request_id
            final.time_to_first_token_s = (call.first_token or time.monotonic()) - call.received
            self._d.metrics.queue_wait.labels(adapter=call.label).observe(final.queue_time_s)
            yield generation_pb2.GenerateResponse(final=final)
            return

    def _observe_delta(self, delta: generation_pb2.TokenDelta, call: Call) -> None:
        m, now = self._d.metrics, time.monotonic()
        m.output_tokens.labels(adapter=call.label).inc(len(delta.token_ids))
        if call.first_token is None:
            call.first_token = now
            m.ttft.labels(adapter=call.label).observe(now - call.received)
        else:
            m.itl.labels(adapter=call.label).observe(now - call.last)
        call.last = now

    def _cancel(self, job: queue_pb2.Job) -> None:
        """Tell the worker to stop (client cancelled, deadline passed, or an error).

        In a tracked background task that retries through a Redis outage for as long as the
        request's keys may live (its deadline + the result TTL).
        """
        until = (
            time.monotonic() + max(job.deadline_ms / 1000 - time.time(), 0) + self._d.result_ttl_s
        )
        self._d.tasks.spawn(
            self._cancel_until_done(job.request_id, until), f"cancel-{job.request_id}"
        )

    async def _cancel_until_done(self, request_id: str, until: float) -> None:
        async def once() -> None:
            await asyncio.wait_for(self._d.producer.cancel(request_id), self._d.cancel_timeout_s)

        def retrying(exc: BaseException) -> None:
            self._d.metrics.cancel_retries.inc()
            log.info("cancel of %s failed (%r); retrying", request_id, exc)

        if not await retry_until(once, until, retrying):
            log.warning("cancel of %s lost: Redis unreachable until its keys expired", request_id)

    def _ended_by_client(self, call: Call, context: grpc.aio.ServicerContext) -> None:
        """The client went away: its deadline passed, or it cancelled."""
        remaining = context.time_remaining()
        deadline = remaining is not None and remaining <= DEADLINE_SLACK_S
        code = grpc.StatusCode.DEADLINE_EXCEEDED if deadline else grpc.StatusCode.CANCELLED
        self._record_failure(
            call, code, "client deadline passed" if deadline else "client cancelled"
        )

    async def _fail(
        self, context: grpc.aio.ServicerContext, call: Call | None, exc: BaseException
    ) -> NoReturn:
        code, message = errors.status_of(exc)
        if call is None:
            self._d.metrics.errors.labels(code=code.name).inc()
        else:
            self._record_failure(call, code, message)
        await errors.abort(context, exc)

    def _record_failure(self, call: Call, code: grpc.StatusCode, message: str) -> None:
        m = self._d.metrics
        m.errors.labels(code=code.name).inc()
        m.outcome(call.label, code.name.lower())
        level = logging.INFO if code is grpc.StatusCode.CANCELLED else logging.WARNING
        log.log(level, "request %r failed: %s: %s", call.request_id, code.name, message)
