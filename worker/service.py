"""The worker's service loop: claim jobs from Redis into the engine and publish its tokens.

    tick():  claim (continuously, adapter affinity) → check cancel / deadline flags →
             engine.step() → publish events → ack jobs whose terminal event went out

A dead worker's jobs are reclaimed by others: one that streamed nothing reruns from scratch,
one that streamed tokens ends with a retryable UNAVAILABLE (docs/serving.md).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis

from broker.keys import BASE, Code, decode_prompt, decode_sampling, failure
from broker.queue import Claimed, Consumer
from broker.results import Outgoing, Publisher, StartState
from protos.lorapool.v1 import generation_pb2, queue_pb2
from protos.lorapool.v1.generation_pb2 import FINISH_REASON_LENGTH, FINISH_REASON_STOP
from worker.engine import Engine
from worker.metrics import WorkerMetrics
from worker.sequence import FinishReason, SamplingParams, TokenEvent

log = logging.getLogger(__name__)

FINISH = {FinishReason.STOP: FINISH_REASON_STOP, FinishReason.LENGTH: FINISH_REASON_LENGTH}


class AdapterFetchError(Exception):
    """An adapter blob could not be fetched or verified."""


@dataclass(frozen=True)
class ServiceSettings:
    max_active: int = 64  # jobs held at once: the engine's max_num_seqs, so none sit idle here
    claim_batch: int = 8  # jobs per claim
    claim_rounds: int = 4  # claims per tick (each from one adapter)
    max_wait_ms: float = 2000  # an adapter's oldest job waiting longer is served first
    idle_sleep_s: float = 0.01
    reclaim_interval_s: float = 1.0  # look for dead workers (cheap)
    sweep_interval_s: float = 30.0  # scan every queue for orphaned jobs and tidy empty ones
    heartbeat_interval_s: float = 0.5
    flags_interval_s: float = 0.05
    drain_s: float = 30.0  # on SIGTERM: time to finish running jobs before handing them back
    result_ttl_s: int = 120


@dataclass
class Active:
    claimed: Claimed
    attempt: int
    admitted_ms: float
    deltas: int = 0
    stop: Code | None = None  # why we cancelled it: CANCELLED, DEADLINE_EXCEEDED, NOT_FOUND (lost)


class WorkerService:
    def __init__(
        self,
        engine: Engine,
        consumer: Consumer,
        publisher: Publisher,
        fetch: Callable[[str], Path | None],
        settings: ServiceSettings,
        metrics: WorkerMetrics,
    ) -> None:
        self.engine = engine
        self.consumer = consumer
        self.publisher = publisher
        self.fetch = fetch
        self.settings = settings
        self.metrics = metrics
        self.active: dict[str, Active] = {}
        self.held: set[str] = {BASE}  # adapter keys registered with the engine
        self._outbox: list[tuple[Outgoing, Claimed | None]] = []
        self._parked: list[tuple[Claimed, int]] = []  # waiting for their adapter's blob
        self._due = {"reclaim": 0.0, "flags": 0.0, "sweep": 0.0}

    def run(self, stop: threading.Event) -> None:
        """Serve until `stop` is set, then drain for `drain_s` and hand back the rest."""
        beating = threading.Event()
        beat = threading.Thread(target=self._heartbeats, args=(beating,), daemon=True)
        beat.start()
        drain_until: float | None = None
        while drain_until is None or (
            (self.active or self._parked) and time.monotonic() < drain_until
        ):
            if stop.is_set() and drain_until is None:
                drain_until = time.monotonic() + self.settings.drain_s
                log.info("stopping: draining %d jobs", len(self.active))
            try:
                self.tick(accepting=drain_until is None)
            except redis.RedisError as exc:
                log.warning("Redis error: %s; retrying", exc)
                time.sleep(0.5)
        beating.set()
        beat.join(5)
        self._hand_back()

    def tick(self, accepting: bool = True) -> None:
        now = time.monotonic()
        if accepting:
            self._claim()
        if now >= self._due["reclaim"]:
            self._due["reclaim"] = now + self.settings.reclaim_interval_s
            full = now >= self._due["sweep"]  # a full sweep also tidies empty queues
            if full:
                self._due["sweep"] = now + self.settings.sweep_interval_s
            for claimed in self.consumer.reclaim(full):
                self._admit(claimed)
        if now >= self._due["flags"]:
            self._due["flags"] = now + self.settings.flags_interval_s
            self._check_flags()
            self._unpark()
        if self.engine.has_unfinished():
            t0 = time.perf_counter()
            events = self.engine.step()
            self.metrics.step(time.perf_counter() - t0, self.engine.stats().running)
            self._on_events(events)
        self._flush()
        self.metrics.tick(len(self.active), self.engine.stats().free_pages)
        if not self.active and not self._outbox:
            time.sleep(self.settings.idle_sleep_s)

    def _claim(self) -> None:
        for _ in range(self.settings.claim_rounds):  # each round claims from one adapter
            busy = len(self.active) + len(self._parked)
            room = min(self.settings.claim_batch, self.settings.max_active - busy)
            claimed = (
                self.consumer.claim(self.held, room, self.settings.max_wait_ms) if room > 0 else []
            )
            if not claimed:
                return
            for job in claimed:
                self._admit(job)

    def _admit(self, claimed: Claimed) -> None:
        job = claimed.job
        if claimed.deliveries > self.consumer.limits.max_deliveries:
            message = f"job failed on {claimed.deliveries - 1} workers; dead-lettered"
            self.consumer.dead_letter(claimed, message)
            self._end(claimed, 0, Code.INTERNAL, message)
            return
        start = self.publisher.begin(job.request_id)
        if start.state is StartState.READY and time.time() * 1000 > job.deadline_ms:
            self._end(
                claimed, start.attempt, Code.DEADLINE_EXCEEDED, "deadline passed while queued"
            )
        elif start.state is StartState.READY:
            self._start(claimed, start.attempt)
        elif start.state is StartState.TOKENS_SENT:
            self._end(claimed, 0, Code.UNAVAILABLE, f"worker lost after {start.sent} tokens; retry")
        elif start.state is StartState.CANCELLED:
            self._end(claimed, 0, Code.CANCELLED, "cancelled")
        else:  # LOST or DONE: nothing to say to anyone
            self.consumer.ack(claimed)

    def _start(self, claimed: Claimed, attempt: int) -> None:
        job = claimed.job
        try:
            if not self._adapter_ready(job.adapter_digest):
                self._parked.append((claimed, attempt))
                return
            sampling = SamplingParams(**decode_sampling(job.request))
            adapter = job.adapter_digest or None
            self.engine.add_request(job.request_id, decode_prompt(job.request), sampling, adapter)
        except AdapterFetchError as exc:
            self._end(claimed, attempt, Code.FAILED_PRECONDITION, str(exc))
            return
        except ValueError as exc:
            self._end(claimed, attempt, Code.INVALID_ARGUMENT, str(exc))
            return
        now_ms = time.time() * 1000
        self.metrics.queue_seconds.observe(max(now_ms - job.enqueued_ms, 0) / 1000)
        self.active[job.request_id] = Active(claimed, attempt, now_ms)

    def _adapter_ready(self, digest: str) -> bool:
        """True once the blob is local and registered; `fetch` works in the background."""
        if not digest or digest in self.held:
            return True
        path = self.fetch(digest)  # None while the blob is still on its way
        if path is None:
            return False
        self.engine.register_adapter(digest, path)
        self.held.add(digest)
        self.metrics.adapters_resident.set(len(self.held) - 1)
        return True

    def _unpark(self) -> None:
        """Start the jobs whose adapter arrived; drop those cancelled or expired meanwhile."""
        parked, self._parked = self._parked, []
        flags = self.publisher.flags([c.job.request_id for c, _ in parked]) if parked else {}
        for claimed, attempt in parked:
            if claimed.job.request_id in flags:
                self._end(claimed, attempt, Code.CANCELLED, "cancelled")
            elif time.time() * 1000 > claimed.job.deadline_ms:
                self._end(claimed, attempt, Code.DEADLINE_EXCEEDED, "deadline passed while queued")
            else:
                self._start(claimed, attempt)

    def _check_flags(self) -> None:
        now_ms = time.time() * 1000
        flags = self.publisher.flags([rid for rid, a in self.active.items() if a.stop is None])
        for rid, a in self.active.items():
            if a.stop is not None:
                continue
            if rid in flags:
                a.stop = Code.CANCELLED if flags[rid] == "cancel" else Code.NOT_FOUND
            elif now_ms > a.claimed.job.deadline_ms:
                a.stop = Code.DEADLINE_EXCEEDED
            if a.stop is not None:
                self.engine.cancel(rid)

    def _on_events(self, events: list[TokenEvent]) -> None:
        for event in events:
            a = self.active.get(event.request_id)
            if a is None:
                continue
            if event.token_ids or event.text:
                a.deltas += 1
                self.metrics.tokens.inc(len(event.token_ids))
                delta = generation_pb2.TokenDelta(
                    seq=a.deltas, text=event.text, token_ids=event.token_ids
                )
                self._send(a, queue_pb2.Event(delta=delta), len(event.token_ids))
            if event.finished:
                self._finish(a, event)

    def _finish(self, a: Active, event: TokenEvent) -> None:
        del self.active[a.claimed.job.request_id]
        reason = event.finish_reason
        if reason in FINISH:
            final = generation_pb2.Final(
                finish_reason=FINISH[reason],  # type: ignore[index]
                prompt_tokens=event.prompt_tokens,
                completion_tokens=event.completion_tokens,
                queue_time_s=max(a.admitted_ms - a.claimed.job.enqueued_ms, 0) / 1000,
            )
            self._send(a, queue_pb2.Event(final=final), 0, ack=True)
            self.metrics.jobs.labels(outcome=str(reason)).inc()
        elif a.stop is Code.NOT_FOUND:  # the request vanished from Redis: no one is listening
            self.consumer.ack(a.claimed)
            self.metrics.jobs.labels(outcome="lost").inc()
        else:
            code = a.stop or Code.FAILED_PRECONDITION
            self._end(a.claimed, a.attempt, code, event.error or code.name.lower())

    def _send(self, a: Active, event: queue_pb2.Event, tokens: int, ack: bool = False) -> None:
        job = a.claimed.job
        out = Outgoing(job.request_id, a.attempt, event, self._ttl_ms(job), tokens)
        self._outbox.append((out, a.claimed if ack else None))

    def _end(self, claimed: Claimed, attempt: int, code: Code, message: str) -> None:
        """Publish a terminal failure for `claimed`, then ack it."""
        out = Outgoing(
            claimed.job.request_id, attempt, failure(code, message), self._ttl_ms(claimed.job)
        )
        self._outbox.append((out, claimed))
        self.metrics.jobs.labels(outcome=code.name.lower()).inc()

    def _flush(self) -> None:
        """Publish everything pending in order; on a Redis error keep it for the next tick."""
        self.publisher.publish([out for out, _ in self._outbox])
        sent, self._outbox = self._outbox, []
        for _, claimed in sent:
            if claimed is not None:
                self.consumer.ack(claimed)

    def _ttl_ms(self, job: queue_pb2.Job) -> int:
        return max(int(job.deadline_ms - time.time() * 1000), 0) + self.settings.result_ttl_s * 1000

    def _heartbeats(self, done: threading.Event) -> None:
        while not done.is_set():
            try:
                self.consumer.heartbeat()
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)
            done.wait(self.settings.heartbeat_interval_s)

    def _hand_back(self) -> None:
        """After the drain: jobs that streamed nothing go back to the queue; others end."""
        for a in list(self.active.values()):
            self.engine.cancel(a.claimed.job.request_id)
            message = f"worker stopped after {a.deltas} tokens; retry"
            if a.deltas:
                self._end(a.claimed, a.attempt, Code.UNAVAILABLE, message)
        self.active.clear()
        self._parked.clear()  # never started: left pending for another worker
        try:
            self._flush()
            self.consumer.retire()  # others reclaim what is left pending, at once
        except redis.RedisError as exc:
            log.warning("could not hand back cleanly: %s", exc)
