"""Gateway checks: names and request ids are full matches; speculative options in range."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
import redis

from broker import keys
from gateway.errors import InvalidField
from gateway.registry import AdapterRecord
from gateway.validation import RequestLimits, check_adapter_ref, validate
from protos.lorapool.v1 import admin_pb2, admin_pb2_grpc, generation_pb2
from tests.adapter_store.test_names import variants
from tests.serving.fakes import GatewayThread, StaticRegistry
from tests.serving.test_gateway import ADMIN_AUTH, generate, settings

Method = generation_pb2.SpeculativeOptions.Method


@pytest.fixture
def gateway(redis_url: str) -> Iterator[GatewayThread]:
    gw = GatewayThread(settings(redis_url), StaticRegistry({"evil": AdapterRecord("evil", 1, "")}))
    yield gw
    gw.stop()


@pytest.mark.parametrize("ref", variants("evil") + variants("evil:1")[:3] + ["evil:1\n"])
def test_adapter_refs_with_control_characters_are_invalid(ref: str) -> None:
    with pytest.raises(InvalidField):
        check_adapter_ref(ref)


@pytest.mark.parametrize("request_id", variants("req-1"))
def test_request_ids_with_control_characters_are_invalid(request_id: str) -> None:
    request = generation_pb2.GenerateRequest(text="hi", request_id=request_id)
    with pytest.raises(InvalidField, match="request_id"):
        validate(request, RequestLimits())


def test_trailing_newline_is_refused_end_to_end(gateway: GatewayThread, redis_url: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        generate(gateway, text="x", adapter="evil\n")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    admin = admin_pb2_grpc.AdminStub(grpc.insecure_channel(gateway.target))
    chunks = [
        admin_pb2.UploadChunk(header=admin_pb2.UploadHeader(name="evil\n")),
        admin_pb2.UploadChunk(data=b"x"),
    ]
    with pytest.raises(grpc.RpcError) as err:
        admin.Upload(iter(chunks), metadata=ADMIN_AUTH, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "header.name" in (err.value.details() or "")
    assert redis.Redis.from_url(redis_url).get(keys.TOTAL) is None


ASKS = [
    dict(method=Method.METHOD_NGRAM),
    dict(method=Method.METHOD_DRAFT_MODEL, num_speculative_tokens=4),
    dict(num_speculative_tokens=3),  # the server's default method, with tokens
    dict(),
    dict(method=Method.METHOD_NONE),
]


@pytest.mark.parametrize("spec", ASKS)
def test_speculative_options_in_range_pass_validation(spec: dict[str, int]) -> None:
    request = generation_pb2.GenerateRequest(text="x", speculative=spec)  # type: ignore[arg-type]
    validate(request, RequestLimits())


def test_out_of_range_speculative_options_are_invalid_argument() -> None:
    spec = generation_pb2.SpeculativeOptions(num_speculative_tokens=17)
    request = generation_pb2.GenerateRequest(text="x", speculative=spec)
    with pytest.raises(InvalidField, match="num_speculative_tokens"):
        validate(request, RequestLimits())
    spec.num_speculative_tokens = 16
    validate(generation_pb2.GenerateRequest(text="x", speculative=spec), RequestLimits())
    spec.method = 9  # type: ignore[assignment]  # an enum value this server does not know
    with pytest.raises(InvalidField, match="speculative.method"):
        validate(generation_pb2.GenerateRequest(text="x", speculative=spec), RequestLimits())
