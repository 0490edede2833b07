"""Every error the gateway answers, mapped to a gRPC status code in one table."""

from __future__ import annotations

from typing import NoReturn

import grpc
import redis

from broker.queue import DuplicateRequest, QueueFull
from gateway.bounded import PoolSaturated


class InvalidField(Exception):
    """A request field is missing or out of range."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class AdapterUnknown(Exception):
    """No ready adapter answers to the reference (never a fall-back to the base model)."""


class AdapterUnservable(Exception):
    """The adapter exists but cannot be served by this deployment."""


class FeatureUnavailable(Exception):
    """The request asks for a feature this server does not offer yet."""


class RegistryDown(Exception):
    """The registry did not answer in time or failed."""


class QueueDown(Exception):
    """Redis is unreachable (the health probe says so, or a call failed)."""


class NoLiveWorker(Exception):
    """No worker has heartbeated for longer than the grace: nothing would serve the request."""


class RequestLost(Exception):
    """The queue no longer knows the request (Redis lost its state)."""


class DeadlinePassed(Exception):
    """The request's deadline passed before it finished."""


class UploadRejected(Exception):
    """An uploaded archive or adapter was refused."""


class WorkerFailure(Exception):
    """A worker ended the request with a status code (numbers from grpc's status.proto)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}

# Exception type → status code. Order matters only for subclasses (first match wins).
STATUS: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (InvalidField, grpc.StatusCode.INVALID_ARGUMENT),
    (UploadRejected, grpc.StatusCode.INVALID_ARGUMENT),
    (AdapterUnknown, grpc.StatusCode.NOT_FOUND),
    (AdapterUnservable, grpc.StatusCode.FAILED_PRECONDITION),
    (FeatureUnavailable, grpc.StatusCode.FAILED_PRECONDITION),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DuplicateRequest, grpc.StatusCode.ALREADY_EXISTS),
    (DeadlinePassed, grpc.StatusCode.DEADLINE_EXCEEDED),
    (RegistryDown, grpc.StatusCode.UNAVAILABLE),
    (QueueDown, grpc.StatusCode.UNAVAILABLE),
    (RequestLost, grpc.StatusCode.UNAVAILABLE),
    (NoLiveWorker, grpc.StatusCode.UNAVAILABLE),
    (PoolSaturated, grpc.StatusCode.UNAVAILABLE),
    (redis.RedisError, grpc.StatusCode.UNAVAILABLE),
    (TimeoutError, grpc.StatusCode.UNAVAILABLE),
]

MAPPED: tuple[type[BaseException], ...] = (WorkerFailure, *(t for t, _ in STATUS))

_MESSAGES: dict[type[BaseException], str] = {
    redis.RedisError: "queue unavailable (Redis): retry later",
    TimeoutError: "a dependency did not answer in time: retry later",
}


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client gets for `exc`."""
    if isinstance(exc, WorkerFailure):
        return _BY_NUMBER.get(exc.code, grpc.StatusCode.UNKNOWN), str(exc)
    for kind, code in STATUS:
        if isinstance(exc, kind):
            fixed = next((m for k, m in _MESSAGES.items() if isinstance(exc, k)), None)
            return code, fixed or str(exc)
    return grpc.StatusCode.UNKNOWN, "internal error"


async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    code, message = status_of(exc)
    await context.abort(code, message)
    raise AssertionError("context.abort returned")  # pragma: no cover
