"""The worker's service loop: claim jobs from Redis into the engine and publish its tokens.

    tick():  claim (affinity: device, host, disk) → admit → stop cancelled / expired /
             abandoned jobs → start parked jobs whose blob arrived → prefetch adapters of
             queued work → trim the blob cache → engine.step() → publish → ack

A dead worker's jobs are reclaimed by others: one that streamed nothing reruns from scratch,
one that streamed tokens ends with a retryable UNAVAILABLE (docs/serving.md). A Redis error
is retried next tick, losing nothing; a failure tied to one job ends that job alone; any
other error (the engine's step, say) fails the process: `run` hands back and re-raises.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import redis

from broker.keys import Code, decode_prompt, decode_sampling, decode_speculative
from broker.queue import Claimed, Consumer
from broker.results import Publisher, StartState
from worker.adapter_feed import AdapterFeed
from worker.blob_cache import AdapterBlobs
from worker.engine import Engine
from worker.jobs import (
    CANCELLED,
    FINISH,
    QUEUED_PAST_DEADLINE,
    Active,
    adapter_label,
    failure_of,
    why_stop,
)
from worker.metrics import WorkerMetrics
from worker.outbox import Outbox
from worker.sequence import SamplingParams, SpecMethod, SpeculativeParams, TokenEvent

log = logging.getLogger(__name__)


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
    prefetch_interval_s: float = 0.25  # look at queued work's adapters (one Redis read)
    drain_s: float = 30.0  # on SIGTERM: time to finish running jobs before handing them back
    result_ttl_s: int = 120
    redis_retry_s: float = 0.5  # pause after a Redis error


class WorkerService:
    def __init__(
        self,
        engine: Engine,
        consumer: Consumer,
        publisher: Publisher,
        blobs: AdapterBlobs,
        settings: ServiceSettings,
        metrics: WorkerMetrics,
    ) -> None:
        self.engine = engine
        self.consumer = consumer
        self.publisher = publisher
        self.blobs = blobs
        self.settings = settings
        self.metrics = metrics
        self.active: dict[str, Active] = {}
        self.feed = AdapterFeed(engine, blobs)
        self._inbox: deque[Claimed] = deque()  # claimed, not admitted yet
        self._parked: list[tuple[Claimed, int]] = []  # waiting for their adapter's blob
        self.outbox = Outbox(publisher, consumer, metrics, settings.result_ttl_s)
        self._due = {"reclaim": 0.0, "flags": 0.0, "sweep": 0.0, "prefetch": 0.0}

    def run(self, stop: threading.Event) -> None:
        """Serve until `stop` is set, then drain for `drain_s` and hand back the rest."""
        beating = threading.Event()
        beat = threading.Thread(target=self._heartbeats, args=(beating,), daemon=True)
        beat.start()
        try:
            self._serve(stop)
        finally:  # also on a failure of the process: others take the jobs over at once
            beating.set()
            beat.join(5)
            self._hand_back()

    def _serve(self, stop: threading.Event) -> None:
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
                time.sleep(self.settings.redis_retry_s)

    def tick(self, accepting: bool = True) -> None:
        now = time.monotonic()
        if accepting:
            self._claim()
        if now >= self._due["reclaim"]:
            self._due["reclaim"] = now + self.settings.reclaim_interval_s
            full = now >= self._due["sweep"]  # a full sweep also tidies empty queues
            if full:
                self._due["sweep"] = now + self.settings.sweep_interval_s
            self._reclaim(full)
        self._admit_inbox()
        if now >= self._due["flags"]:
            self._due["flags"] = now + self.settings.flags_interval_s
            self._check_flags()
            self._unpark()
            self._trim()
        if now >= self._due["prefetch"]:
            self._due["prefetch"] = now + self.settings.prefetch_interval_s
            self.feed.prefetch(adapter for adapter, _ in self.consumer.ready())
        if self.engine.has_unfinished():
            t0 = time.perf_counter()
            events = self.engine.step()
            self.metrics.step(time.perf_counter() - t0, self.engine.stats().running)
            self._on_events(events)
        self.outbox.flush()
        self.metrics.tick(len(self.active), self.engine.stats())
        if not self.active and not self.outbox:
            time.sleep(self.settings.idle_sleep_s)

    def _claim(self) -> None:
        for _ in range(self.settings.claim_rounds):  # each round claims from one adapter
            busy = len(self.active) + len(self._parked) + len(self._inbox)
            room = min(self.settings.claim_batch, self.settings.max_active - busy)
            if room <= 0:
                return
            affinity = self.feed.affinity()
            claim = partial(self.consumer.claim, affinity, room, self.settings.max_wait_ms)
            if not self._take(claim):
                return

    def _reclaim(self, full: bool) -> None:
        for c in self._take(lambda: self.consumer.reclaim(full)):
            self.metrics.reclaimed.inc()
            rid, label = c.job.request_id, adapter_label(c.job)
            log.info("reclaimed job %s (%s, delivery %d)", rid, label, c.deliveries)

    def _take(self, claim: Callable[[], list[Claimed]]) -> list[Claimed]:
        """Jobs claimed go to the inbox, to be admitted in order."""
        claimed = claim()  # an undecodable entry is dead-lettered by the broker, alone
        self._inbox.extend(claimed)
        return claimed

    def _admit_inbox(self) -> None:
        while self._inbox:
            self._admit(self._inbox[0])  # on a Redis error it stays for the next tick
            self._inbox.popleft()

    def _admit(self, claimed: Claimed) -> None:
        job = claimed.job
        if claimed.deliveries > self.consumer.limits.max_deliveries:
            message = f"job failed on {claimed.deliveries - 1} workers; dead-lettered"
            self.consumer.dead_letter(claimed, message)
            self.outbox.end(claimed, 0, Code.INTERNAL, message)
            return
        start = self.publisher.begin(job.request_id)
        if start.state is StartState.READY and time.time() * 1000 > job.deadline_ms:
            self.outbox.stop(claimed, start.attempt, QUEUED_PAST_DEADLINE)
        elif start.state is StartState.READY:
            self._start(claimed, start.attempt)
        elif start.state is StartState.TOKENS_SENT:
            message = f"worker lost after {start.sent} tokens; retry"
            self.outbox.end(claimed, 0, Code.UNAVAILABLE, message)
        elif start.state is StartState.CANCELLED:
            self.outbox.stop(claimed, 0, CANCELLED)
        else:  # LOST or DONE: nothing to say to anyone
            self.outbox.ack(claimed)

    def _start(self, claimed: Claimed, attempt: int) -> None:
        job = claimed.job
        try:
            if not self.feed.ready(job.adapter_digest):
                self._parked.append((claimed, attempt))
                return
            sampling = SamplingParams(**decode_sampling(job.request))
            adapter = job.adapter_digest or None
            spec = decode_speculative(job.request)
            speculative = SpeculativeParams(
                SpecMethod(spec["method"]) if spec["method"] else None, spec["num_tokens"]
            )
            prompt = decode_prompt(job.request)
            self.engine.add_request(job.request_id, prompt, sampling, adapter, speculative)
        # The one per-job boundary: whatever goes wrong while one job starts (a blob the store
        # cannot deliver, a request the engine refuses, a bug in either) ends that job alone,
        # with a status code that says which and the traceback in the log; the loop goes on.
        except Exception as exc:  # noqa: BLE001
            code, message = failure_of(exc)
            trace = exc if code is Code.INTERNAL else None  # a bug: keep its traceback
            self.outbox.end(claimed, attempt, code, message, trace)
            return
        now_ms = time.time() * 1000
        label = adapter_label(job)
        self.metrics.admitted(label, max(now_ms - job.enqueued_ms, 0) / 1000)
        self.active[job.request_id] = Active(claimed, attempt, now_ms, time.monotonic(), label)

    def _unpark(self) -> None:
        """Start the jobs whose adapter arrived; drop those stopped or expired meanwhile."""
        flags = self.publisher.flags([c.job.request_id for c, _ in self._parked])
        parked, self._parked = self._parked, []
        now_ms = time.time() * 1000
        for claimed, attempt in parked:
            stop = why_stop(claimed.job, flags.get(claimed.job.request_id), now_ms, queued=True)
            if stop is not None:
                self.outbox.stop(claimed, attempt, stop)
            else:
                self._start(claimed, attempt)

    def _check_flags(self) -> None:
        """Stop running jobs that expired, were cancelled, abandoned or lost: at once."""
        running = [a for a in self.active.values() if a.stop is None]
        flags = self.publisher.flags([a.request_id for a in running])
        now_ms = time.time() * 1000
        for a in running:
            a.stop = why_stop(a.claimed.job, flags.get(a.request_id), now_ms, queued=False)
            if a.stop is not None:
                self.engine.cancel(a.request_id)  # its pages are freed now

    def _trim(self) -> None:
        """Keep the blob cache in budget; an evicted blob is no longer held."""
        in_use = {a.digest for a in self.active.values()}
        in_use.update(c.job.adapter_digest for c, _ in self._parked)
        in_use.discard("")
        evicted = self.feed.trim(in_use)
        self.metrics.cache(len(self.feed.held), self.blobs.used_bytes, len(evicted))

    def _on_events(self, events: list[TokenEvent]) -> None:
        for event in events:
            a = self.active.get(event.request_id)
            if a is None:
                continue
            if event.token_ids or event.text:
                self.outbox.delta(a, event)
            if event.finished:
                self._finish(a, event)

    def _finish(self, a: Active, event: TokenEvent) -> None:
        del self.active[a.request_id]
        if event.finish_reason in FINISH:
            self.outbox.finish(a, event)
        elif a.stop is not None:
            self.outbox.stop(a.claimed, a.attempt, a.stop)
        else:  # the engine ended it: an adapter that does not load, say
            message = event.error or "failed_precondition"
            self.outbox.end(a.claimed, a.attempt, Code.FAILED_PRECONDITION, message)

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
            message = f"worker stopped after {a.deltas} tokens; retry"
            if a.deltas:
                self.outbox.end(a.claimed, a.attempt, Code.UNAVAILABLE, message)
        self.active.clear()
        self._parked.clear()  # never started: left pending for another worker
        self._inbox.clear()  # likewise
        try:
            self.outbox.flush()
            self.consumer.retire()  # others reclaim what is left pending, at once
        except redis.RedisError as exc:
            log.warning("could not hand back cleanly: %s", exc)
