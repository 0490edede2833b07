"""What a worker tells Redis about its jobs: events to publish, then jobs to ack.

Every job ends here exactly once (a final event, a terminal failure, or a silent ack when
nobody is left to tell), is counted in the metrics by adapter and outcome, and every end
that is not a normal finish gets a log line naming its request id. Nothing is lost to a
Redis error: `flush` keeps what it could not publish or ack for the next try.
"""

from __future__ import annotations

import logging
import time
from collections import deque

from broker.keys import Code, failure
from broker.queue import Claimed, Consumer
from broker.results import Outgoing, Publisher
from protos.lorapool.v1 import generation_pb2, queue_pb2
from worker.jobs import Active, Stop, adapter_label, final_event
from worker.metrics import WorkerMetrics
from worker.sequence import TokenEvent

log = logging.getLogger(__name__)

QUIET = (Code.CANCELLED, Code.DEADLINE_EXCEEDED)  # ends the client asked for: not failures


class Outbox:
    def __init__(
        self,
        publisher: Publisher,
        consumer: Consumer,
        metrics: WorkerMetrics,
        result_ttl_s: int,
    ) -> None:
        self._publisher = publisher
        self._consumer = consumer
        self._metrics = metrics
        self._result_ttl_s = result_ttl_s
        self._events: deque[tuple[Outgoing, Claimed | None]] = deque()  # + the job to ack
        self._acks: deque[Claimed] = deque()  # published: ack these next

    def __bool__(self) -> bool:
        return bool(self._events or self._acks)

    def delta(self, a: Active, event: TokenEvent) -> None:
        """The tokens of a running job: the next delta of its stream."""
        if a.deltas == 0:
            self._metrics.first_token(a.adapter, time.monotonic() - a.admitted_s)
        a.deltas += 1
        n = len(event.token_ids)
        self._metrics.output_tokens(a.adapter, n)
        delta = generation_pb2.TokenDelta(seq=a.deltas, text=event.text, token_ids=event.token_ids)
        self._events.append((self._outgoing(a, queue_pb2.Event(delta=delta), n), None))

    def finish(self, a: Active, event: TokenEvent) -> None:
        """The final event of a job that finished; acked once it is out."""
        self._events.append((self._outgoing(a, final_event(a, event), 0), a.claimed))
        self._metrics.job_ended(a.adapter, str(event.finish_reason))

    def ack(self, claimed: Claimed) -> None:
        """A job that needs no event: its request is gone, or already ended."""
        self._acks.append(claimed)

    def stop(self, claimed: Claimed, attempt: int, stop: Stop) -> None:
        if stop.code is Code.NOT_FOUND:  # the request vanished from Redis: no one is listening
            self.ack(claimed)
            self._ended(claimed, stop.outcome, logging.INFO, stop.message)
        else:
            self.end(claimed, attempt, stop.code, stop.message, outcome=stop.outcome)

    def end(
        self,
        claimed: Claimed,
        attempt: int,
        code: Code,
        message: str,
        exc: Exception | None = None,
        outcome: str | None = None,
    ) -> None:
        """Publish a terminal failure for `claimed`, then ack it."""
        job = claimed.job
        out = Outgoing(job.request_id, attempt, failure(code, message), self._ttl_ms(job))
        self._events.append((out, claimed))
        level = logging.INFO if code in QUIET else logging.WARNING
        self._ended(claimed, outcome or code.name.lower(), level, message, exc)

    def flush(self) -> None:
        """Publish everything pending in order, then ack; a Redis error keeps the rest."""
        self._publisher.publish([out for out, _ in self._events])
        self._acks.extend(claimed for _, claimed in self._events if claimed is not None)
        self._events.clear()
        while self._acks:
            self._consumer.ack(self._acks[0])
            self._acks.popleft()

    def _ended(
        self, claimed: Claimed, outcome: str, level: int, message: str, exc: Exception | None = None
    ) -> None:
        label = adapter_label(claimed.job)
        self._metrics.job_ended(label, outcome)
        rid = claimed.job.request_id
        log.log(level, "job %s (%s) ended %s: %s", rid, label, outcome, message, exc_info=exc)

    def _outgoing(self, a: Active, event: queue_pb2.Event, tokens: int) -> Outgoing:
        return Outgoing(a.request_id, a.attempt, event, self._ttl_ms(a.claimed.job), tokens)

    def _ttl_ms(self, job: queue_pb2.Job) -> int:
        return max(int(job.deadline_ms - time.time() * 1000), 0) + self._result_ttl_s * 1000
