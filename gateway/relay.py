"""Reading one request's result stream: in order, once each, while someone can serve it."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from broker.queue import Producer
from broker.results import Reader
from gateway.errors import DeadlinePassed, NoLiveWorker, RequestLost
from gateway.probe import RedisProbe
from protos.lorapool.v1 import queue_pb2

READ_BLOCK_MS = 500  # one XREAD waits at most this long; then the request's state is checked
NO_LIVE_WORKER = "no live worker: retry later"


@dataclass
class Seen:
    """The deltas relayed so far: the highest seq per attempt.

    A worker retries a publish batch whole after a partial failure, so a delta may reach
    the stream twice; deltas of one attempt carry seq 1, 2, 3... in order, so anything at
    or below the highest seq relayed for its attempt is a duplicate.
    """

    highest: dict[int, int] = field(default_factory=dict)

    def first_time(self, event: queue_pb2.Event) -> bool:
        if event.WhichOneof("kind") != "delta" or event.delta.seq == 0:
            return True
        if event.delta.seq <= self.highest.get(event.attempt, 0):
            return False
        self.highest[event.attempt] = event.delta.seq
        return True


@dataclass(frozen=True)
class Relay:
    reader: Reader
    producer: Producer
    probe: RedisProbe
    no_worker_grace_s: float

    async def events(self, job: queue_pb2.Job) -> AsyncIterator[queue_pb2.Event]:
        """The job's events, duplicates dropped, until the caller stops reading.

        While nothing arrives: past the deadline → DeadlinePassed; no live worker for
        longer than the grace → NoLiveWorker; the request gone from Redis → RequestLost.
        """
        after = "0"
        seen = Seen()
        while True:
            batch = await self.reader.read(job.request_id, after, READ_BLOCK_MS)
            if not batch:
                await self._check_waiting(job)
            for entry_id, event in batch:
                after = entry_id
                if seen.first_time(event):
                    yield event

    async def _check_waiting(self, job: queue_pb2.Job) -> None:
        if time.time() * 1000 > job.deadline_ms + READ_BLOCK_MS:
            raise DeadlinePassed("deadline exceeded")
        if self.probe.workerless(self.no_worker_grace_s):
            raise NoLiveWorker(NO_LIVE_WORKER)
        if not await self.producer.exists(job.request_id):
            raise RequestLost("the queue lost this request (Redis restarted?): retry")
