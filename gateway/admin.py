"""The Admin service: upload (a streamed tar of a PEFT directory), get and delete adapters."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import NoReturn

import grpc

from gateway import errors
from gateway.errors import InvalidField, UploadRejected
from gateway.metrics import GatewayMetrics
from gateway.registry import CachedResolver, Registry
from gateway.unpack import Spool, UploadLimits
from gateway.validation import check_adapter_ref
from protos.lorapool.v1 import admin_pb2, admin_pb2_grpc, generation_pb2

log = logging.getLogger(__name__)


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(
        self,
        registry: Registry,
        resolver: CachedResolver,
        metrics: GatewayMetrics,
        limits: UploadLimits,
        timeout_s: float = 120.0,
    ) -> None:
        self._registry = registry
        self._resolver = resolver
        self._metrics = metrics
        self._limits = limits
        self._timeout_s = timeout_s

    async def Upload(  # noqa: N802 (gRPC method name)
        self,
        request_iterator: AsyncIterator[admin_pb2.UploadChunk],
        context: grpc.aio.ServicerContext,
    ) -> generation_pb2.AdapterInfo:
        self._metrics.requests.labels(method="Upload").inc()
        spool = Spool(self._limits)
        try:
            try:
                header = await self._receive(request_iterator, spool)
                directory = await spool.unpack()
                record = await asyncio.wait_for(
                    self._registry.upload(directory, header.name, header.description),
                    self._timeout_s,
                )
            finally:
                await spool.close()
        except errors.MAPPED as exc:
            await self._fail(context, exc)
        self._resolver.forget()
        return record.to_proto()

    async def Get(  # noqa: N802
        self, request: admin_pb2.AdapterRef, context: grpc.aio.ServicerContext
    ) -> generation_pb2.AdapterInfo:
        self._metrics.requests.labels(method="Get").inc()
        try:
            check_adapter_ref(request.ref, "ref")
            record = await asyncio.wait_for(self._registry.resolve(request.ref), self._timeout_s)
        except errors.MAPPED as exc:
            await self._fail(context, exc)
        return record.to_proto()

    async def Delete(  # noqa: N802
        self, request: admin_pb2.AdapterRef, context: grpc.aio.ServicerContext
    ) -> admin_pb2.DeleteResponse:
        self._metrics.requests.labels(method="Delete").inc()
        try:
            check_adapter_ref(request.ref, "ref")
            if not request.ref:
                raise InvalidField("ref", "must not be empty")
            record = await asyncio.wait_for(self._registry.delete(request.ref), self._timeout_s)
        except errors.MAPPED as exc:
            await self._fail(context, exc)
        self._resolver.forget()
        return admin_pb2.DeleteResponse(adapter=record.to_proto())

    async def _receive(
        self, chunks: AsyncIterator[admin_pb2.UploadChunk], spool: Spool
    ) -> admin_pb2.UploadHeader:
        header: admin_pb2.UploadHeader | None = None
        size = 0
        async for chunk in chunks:
            if chunk.WhichOneof("part") == "header":
                if header is not None:
                    raise InvalidField("header", "sent twice")
                header = chunk.header
                check_adapter_ref(header.name, "header.name")
                continue
            if header is None:
                raise InvalidField("header", "must come first")
            size += len(chunk.data)
            if size > self._limits.max_upload_bytes:
                raise UploadRejected(f"archive larger than {self._limits.max_upload_bytes} bytes")
            await spool.write(chunk.data)
        if header is None or not header.name or ":" in header.name:
            raise InvalidField("header.name", "an adapter name (no version) is required")
        if size == 0:
            raise InvalidField("data", "no archive bytes received")
        return header

    async def _fail(self, context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
        code, message = errors.status_of(exc)
        self._metrics.errors.labels(code=code.name).inc()
        log.warning("admin call failed: %s: %s", code.name, message)
        await errors.abort(context, exc)
