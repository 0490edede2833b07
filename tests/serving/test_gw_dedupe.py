"""A publish batch retried after a partial failure reaches the client once."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from broker.results import Outgoing, StartState
from protos.lorapool.v1 import generation_pb2, queue_pb2
from tests.serving.fakes import FakeWorker, GatewayThread, StaticRegistry
from tests.serving.test_gateway import generate, settings


class RetryingWorker(FakeWorker):
    """Streams the prompt as three deltas, publishing like a worker whose pipeline broke
    after two of three events were applied and that then retried the whole batch."""

    def serve(self, job: queue_pb2.Job) -> None:
        start = self.publisher.begin(job.request_id)
        assert start.state is StartState.READY

        def out(event: queue_pb2.Event, tokens: int) -> Outgoing:
            return Outgoing(job.request_id, start.attempt, event, 60_000, tokens)

        deltas = [
            out(queue_pb2.Event(delta=generation_pb2.TokenDelta(seq=i, text=c)), 1)
            for i, c in enumerate(job.request.text, 1)
        ]
        assert self.publisher.publish(deltas[:2]) == [True, True]  # applied, then "broke"
        assert self.publisher.publish(deltas) == [True, True, True]  # the retry: all again
        final = generation_pb2.Final(completion_tokens=len(deltas))
        self.publisher.publish([out(queue_pb2.Event(final=final), 0)])


@pytest.fixture
def gateway(redis_url: str) -> Iterator[GatewayThread]:
    gw = GatewayThread(settings(redis_url), StaticRegistry())
    yield gw
    gw.stop()


def test_client_sees_each_delta_once_after_a_retried_publish(
    gateway: GatewayThread, redis_url: str
) -> None:
    worker = RetryingWorker(redis_url)
    worker.start()
    try:
        out = generate(gateway, timeout=60, text="abc")
    finally:
        worker.halt()
    deltas = [r.delta for r in out if r.HasField("delta")]
    assert [(d.seq, d.text) for d in deltas] == [(1, "a"), (2, "b"), (3, "c")]
    assert out[-1].HasField("final") and len(out) == 4


def test_seen_keys_deltas_by_attempt_and_seq() -> None:
    from gateway.relay import Seen

    def delta(attempt: int, seq: int) -> queue_pb2.Event:
        return queue_pb2.Event(attempt=attempt, delta=generation_pb2.TokenDelta(seq=seq))

    seen = Seen()
    firsts = [seen.first_time(delta(a, s)) for a, s in [(1, 1), (1, 2), (1, 1), (1, 2), (2, 1)]]
    assert firsts == [True, True, False, False, True]
    assert seen.first_time(queue_pb2.Event(attempt=1, final=generation_pb2.Final()))
