"""Token auth: the Bearer scheme in any case, and only one kind of token configured."""

from __future__ import annotations

import grpc
import pytest

from gateway.auth import bearer, decide
from gateway.registry import AdapterRecord
from protos.lorapool.v1 import admin_pb2, admin_pb2_grpc, generation_pb2
from tests.serving.fakes import FakeWorker, GatewayThread, StaticRegistry
from tests.serving.test_gateway import stub

GENERATE = "/lorapool.v1.Generation/Generate"
ADMIN_GET = "/lorapool.v1.Admin/Get"
OK = None
UNAUTH = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_bearer_scheme_is_case_insensitive(scheme: str) -> None:
    assert bearer([("authorization", f"{scheme} tok")]) == "tok"
    assert bearer([("authorization", f"{scheme}  tok ")]) == "tok"


@pytest.mark.parametrize(
    "value", ["tok", "Basic tok", "Bearer", "Bearer ", "Bearertok", "Token tok"]
)
def test_other_schemes_and_empty_tokens_are_no_bearer(value: str) -> None:
    assert bearer([("authorization", value)]) is None


# (method, token) → outcome, with only API tokens, then only admin tokens configured.
ONLY_API = [
    (GENERATE, "api", OK),
    (GENERATE, None, UNAUTH),
    (GENERATE, "wrong", UNAUTH),
    (ADMIN_GET, "api", DENIED),  # no admin token exists: the admin service stays shut
    (ADMIN_GET, None, UNAUTH),
    (ADMIN_GET, "wrong", UNAUTH),
]
ONLY_ADMIN = [
    (GENERATE, None, OK),  # loopback development: Generate is open (settings refuse it
    (GENERATE, "anything", OK),  # beyond loopback without API tokens)
    (ADMIN_GET, "admin", OK),
    (ADMIN_GET, None, UNAUTH),
    (ADMIN_GET, "wrong", UNAUTH),
]


@pytest.mark.parametrize(("method", "token", "outcome"), ONLY_API)
def test_only_api_tokens(method: str, token: str | None, outcome: object) -> None:
    refusal = decide(method, token, ("api",), ())
    assert (refusal and refusal[0]) == outcome


@pytest.mark.parametrize(("method", "token", "outcome"), ONLY_ADMIN)
def test_only_admin_tokens(method: str, token: str | None, outcome: object) -> None:
    refusal = decide(method, token, (), ("admin",))
    assert (refusal and refusal[0]) == outcome


def test_lowercase_bearer_and_one_kind_of_token_through_the_gateway(redis_url: str) -> None:
    from tests.serving.test_gateway import settings

    registry = StaticRegistry({"upper": AdapterRecord("upper", 1, "a" * 64)})
    worker = FakeWorker(redis_url)
    worker.start()
    gw = GatewayThread(settings(redis_url, admin_tokens=()), registry)  # API tokens only
    try:
        request = generation_pb2.GenerateRequest(text="hi")
        lower = (("authorization", "bearer api-token"),)
        assert list(stub(gw).Generate(request, metadata=lower, timeout=30))[-1].HasField("final")
        admin = admin_pb2_grpc.AdminStub(grpc.insecure_channel(gw.target))
        with pytest.raises(grpc.RpcError) as err:
            admin.Get(admin_pb2.AdapterRef(ref="upper"), metadata=lower, timeout=10)
        assert err.value.code() == DENIED
        with pytest.raises(grpc.RpcError) as err:
            list(stub(gw).Generate(request, timeout=10))
        assert err.value.code() == UNAUTH
        assert gw.sample("lorapool_gateway_auth_refusals_total", code="UNAUTHENTICATED") == 1
        assert gw.sample("lorapool_gateway_auth_refusals_total", code="PERMISSION_DENIED") == 1
    finally:
        worker.halt()
        gw.stop()
