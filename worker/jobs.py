"""Jobs as the worker's service loop tracks them: why one stops, how its end is reported.

A job is claimed from Redis, admitted into the engine (or parked while its adapter's blob
arrives) and ends exactly once: finished, stopped (a cancel, nobody reading its results,
its deadline, Redis forgetting it), or failed with a status code that says why.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.keys import Code
from broker.queue import Claimed
from protos.lorapool.v1 import generation_pb2, queue_pb2
from protos.lorapool.v1.generation_pb2 import FINISH_REASON_LENGTH, FINISH_REASON_STOP
from worker.blob_cache import AdapterFetchError
from worker.metrics import BASE
from worker.sequence import FinishReason, NotServedHere, TokenEvent

FINISH = {FinishReason.STOP: FINISH_REASON_STOP, FinishReason.LENGTH: FINISH_REASON_LENGTH}


@dataclass(frozen=True)
class Stop:
    """Why the worker stops a job it did not finish."""

    code: Code  # what the client is told
    outcome: str  # the metrics outcome
    message: str


CANCELLED = Stop(Code.CANCELLED, "cancelled", "cancelled")
ABANDONED = Stop(Code.CANCELLED, "abandoned", "abandoned: nobody read the results")
LOST = Stop(Code.NOT_FOUND, "lost", "the request is gone from Redis")  # nobody to tell
DEADLINE = Stop(Code.DEADLINE_EXCEEDED, "deadline_exceeded", "deadline exceeded")
QUEUED_PAST_DEADLINE = Stop(
    Code.DEADLINE_EXCEEDED, "deadline_exceeded", "deadline passed while queued"
)
# What broker.results.Publisher.flags says → why the job stops (an unknown flag: a cancel).
FLAGS = {"cancel": CANCELLED, "abandoned": ABANDONED, "lost": LOST}

# Exceptions that end one job as it starts → its status code; anything else is INTERNAL.
FAILURES: tuple[tuple[type[Exception], Code], ...] = (
    (AdapterFetchError, Code.FAILED_PRECONDITION),  # blob not fetched, malformed, refused
    (NotServedHere, Code.FAILED_PRECONDITION),  # valid, but not servable by this worker
    (ValueError, Code.INVALID_ARGUMENT),  # the engine refuses the request (prompt too long)
)


def why_stop(job: queue_pb2.Job, flag: str | None, now_ms: float, queued: bool) -> Stop | None:
    """Why a job must stop now, if it must: its deadline first (a gateway also sets `cancel`
    when a client's deadline passes, and that is a deadline), then its flag."""
    if now_ms > job.deadline_ms:
        return QUEUED_PAST_DEADLINE if queued else DEADLINE
    if flag is not None:
        return FLAGS.get(flag, CANCELLED)
    return None


def failure_of(exc: Exception) -> tuple[Code, str]:
    """The status code and client message for an exception that ended one job."""
    for kind, code in FAILURES:
        if isinstance(exc, kind):
            return code, str(exc)
    return Code.INTERNAL, f"worker error ({type(exc).__name__}); see the worker's log"


def adapter_label(job: queue_pb2.Job) -> str:
    """`name:version` as the gateway resolved it, `base`, or a digest prefix (older gateways)."""
    if not job.adapter_digest:
        return BASE
    return job.adapter_ref or f"digest:{job.adapter_digest[:12]}"


@dataclass
class Active:
    """A job admitted into the engine."""

    claimed: Claimed
    attempt: int
    admitted_ms: float  # wall clock, for the queue time the client is told
    admitted_s: float  # monotonic, for the time to first token
    adapter: str  # its metrics label
    deltas: int = 0
    stop: Stop | None = None  # set when the worker cancelled it in the engine

    @property
    def request_id(self) -> str:
        return self.claimed.job.request_id

    @property
    def digest(self) -> str:
        return self.claimed.job.adapter_digest


def final_event(a: Active, event: TokenEvent) -> queue_pb2.Event:
    final = generation_pb2.Final(
        finish_reason=FINISH[event.finish_reason],  # type: ignore[index]
        prompt_tokens=event.prompt_tokens,
        completion_tokens=event.completion_tokens,
        queue_time_s=max(a.admitted_ms - a.claimed.job.enqueued_ms, 0) / 1000,
    )
    return queue_pb2.Event(final=final)
