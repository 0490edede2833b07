"""Key names, limits and payload encoding of the Redis contract (ARCHITECTURE.md §3).

Keys (every per-request key expires):
    lp:q:{adapter}     stream of queued jobs for one adapter (digest, or `base`), group `workers`
    lp:ready           zset: adapters with undelivered jobs, scored by the oldest one's enqueue ms
    lp:streams         set of adapter keys that have a queue stream
    lp:total           number of jobs queued or running, all adapters
    lp:hb:{worker}     heartbeat of a live worker (expires)
    lp:workers         set of workers that have heartbeated (a dead one is removed once reclaimed)
    lp:dead            dead-letter stream (capped)
    lp:m:{request_id}  hash per request: attempt, sent (tokens published), done, cancel,
                       seen (Redis TIME in ms when a gateway last read the result stream)
    lp:r:{request_id}  stream of result events per request
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from protos.lorapool.v1 import generation_pb2, queue_pb2

GROUP = "workers"
BASE = "base"  # adapter key of the base model
READY = "lp:ready"
STREAMS = "lp:streams"
TOTAL = "lp:total"
DEAD = "lp:dead"
WORKERS = "lp:workers"  # set of workers that heartbeat
PAYLOAD = "job"  # the field of a queue entry that holds the encoded Job
EVENT = "ev"  # the field of a result entry that holds the encoded Event


def queue(adapter: str) -> str:
    return f"lp:q:{adapter}"


def meta(request_id: str) -> str:
    return f"lp:m:{request_id}"


def results(request_id: str) -> str:
    return f"lp:r:{request_id}"


def heartbeat(worker: str) -> str:
    return f"lp:hb:{worker}"


def adapter_key(digest: str) -> str:
    """The queue an adapter's jobs go to: its blob digest, or `base`."""
    return digest or BASE


@dataclass(frozen=True)
class Limits:
    """Queue bounds and timings, shared by whoever talks to Redis."""

    max_depth_per_adapter: int = 256  # jobs queued or running for one adapter
    max_depth_total: int = 4096  # jobs queued or running in all
    max_deliveries: int = 3  # deliveries before a job goes to the dead-letter stream
    result_ttl_s: int = 120  # how long result and meta keys outlive the deadline
    heartbeat_ttl_s: float = 3.0  # a worker whose heartbeat is older is dead
    dead_letter_maxlen: int = 10_000
    abandon_after_s: float = 10.0  # a request whose reader was not seen this long is abandoned

    def __post_init__(self) -> None:
        for name in ("max_depth_per_adapter", "max_depth_total", "max_deliveries"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if min(self.heartbeat_ttl_s, self.result_ttl_s, self.abandon_after_s) <= 0:
            raise ValueError("heartbeat_ttl_s, result_ttl_s and abandon_after_s must be positive")


def encode_job(job: queue_pb2.Job) -> bytes:
    return job.SerializeToString()


def decode_job(data: bytes) -> queue_pb2.Job:
    job = queue_pb2.Job()
    job.ParseFromString(data)
    return job


def decode_prompt(
    request: generation_pb2.GenerateRequest,
) -> str | list[int] | list[dict[str, str]]:
    """The prompt as plain Python: text, token ids, or chat messages."""
    kind = request.WhichOneof("prompt")
    if kind == "chat":
        return [{"role": m.role, "content": m.content} for m in request.chat.messages]
    if kind == "token_ids":
        return list(request.token_ids.ids)
    return request.text


def decode_sampling(request: generation_pb2.GenerateRequest) -> dict[str, Any]:
    """Sampling fields as keyword arguments; unset optional fields are left out."""
    s = request.sampling
    present = {f: getattr(s, f) for f in ("temperature", "top_p", "seed") if s.HasField(f)}
    return dict(
        top_k=s.top_k,
        max_tokens=s.max_tokens or 64,
        stop=tuple(s.stop),
        ignore_eos=s.ignore_eos,
        **present,
    )


# SpeculativeOptions.Method → the worker's method name (None: the server's default).
SPECULATIVE_METHODS: dict[int, str | None] = {
    generation_pb2.SpeculativeOptions.METHOD_UNSPECIFIED: None,
    generation_pb2.SpeculativeOptions.METHOD_NONE: "none",
    generation_pb2.SpeculativeOptions.METHOD_NGRAM: "ngram",
    generation_pb2.SpeculativeOptions.METHOD_DRAFT_MODEL: "draft",
}


def decode_speculative(request: generation_pb2.GenerateRequest) -> dict[str, Any]:
    """Speculative options as keyword arguments: method (None: the server's default) and
    num_tokens (0: the server's default γ)."""
    spec = request.speculative
    return dict(method=SPECULATIVE_METHODS[spec.method], num_tokens=spec.num_speculative_tokens)


def encode_event(event: queue_pb2.Event) -> bytes:
    return event.SerializeToString()


def decode_event(data: bytes) -> queue_pb2.Event:
    event = queue_pb2.Event()
    event.ParseFromString(data)
    return event


class Code(enum.IntEnum):
    """gRPC status codes a worker may end a request with (numbers from grpc's status.proto)."""

    CANCELLED = 1
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    INTERNAL = 13
    UNAVAILABLE = 14


def failure(code: Code, message: str) -> queue_pb2.Event:
    return queue_pb2.Event(failure=queue_pb2.Failure(code=int(code), message=message))


def async_client(url: str, timeout_s: float) -> aioredis.Redis:
    """A redis.asyncio client that fails fast (no retries) so callers can answer UNAVAILABLE."""
    return aioredis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=AsyncRetry(NoBackoff(), 0),
    )


def sync_client(url: str, timeout_s: float) -> redis.Redis:
    """A blocking client with the same fail-fast behaviour, for workers."""
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
    )
