"""Bearer-token auth for every method, checked by an interceptor before any handler runs."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

ADMIN_PREFIX = "/lorapool.v1.Admin/"
# Probes and tooling need no token: the health service and server reflection.
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _matches(token: str, allowed: tuple[str, ...]) -> bool:
    return any(hmac.compare_digest(token.encode(), a.encode()) for a in allowed)


def bearer(metadata: Any) -> str | None:
    """The token of an `authorization: Bearer <token>` header; the scheme is case-insensitive
    (RFC 6750 / RFC 7235)."""
    for key, value in metadata or ():
        if key != "authorization" or not isinstance(value, str):
            continue
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


def decide(
    method: str, token: str | None, api: tuple[str, ...], admin: tuple[str, ...]
) -> tuple[grpc.StatusCode, str] | None:
    """None when the call may proceed, else the status to refuse it with."""
    if method.startswith(OPEN_PREFIXES):
        return None
    is_admin = method.startswith(ADMIN_PREFIX)
    if not api and not admin:
        return None  # no tokens configured: loopback-only development mode
    if not is_admin and not api:
        return None
    if token is None:
        return grpc.StatusCode.UNAUTHENTICATED, "missing bearer token"
    if _matches(token, admin):
        return None
    if not _matches(token, api):
        return grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token"
    if is_admin:
        return grpc.StatusCode.PERMISSION_DENIED, "the admin service needs an admin token"
    return None


class TokenAuth(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        api_tokens: tuple[str, ...],
        admin_tokens: tuple[str, ...],
        on_refusal: Callable[[grpc.StatusCode], None] | None = None,
    ) -> None:
        self._api = api_tokens
        self._admin = admin_tokens
        self._on_refusal = on_refusal

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        details: Any = handler_call_details
        refusal = decide(
            details.method, bearer(details.invocation_metadata), self._api, self._admin
        )
        handler = await continuation(handler_call_details)
        if refusal is None or handler is None:
            return handler
        if self._on_refusal is not None:
            self._on_refusal(refusal[0])
        return _refuse(handler, *refusal)


def _refuse(handler: Any, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind that aborts without reading the request."""

    async def deny(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny)
    return grpc.unary_unary_rpc_method_handler(deny)
