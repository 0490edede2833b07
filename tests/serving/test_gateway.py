"""The gateway against real Redis, a static registry and a scripted worker."""

from __future__ import annotations

import io
import math
import tarfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker import keys
from broker.keys import Limits
from gateway.registry import AdapterRecord
from gateway.settings import GatewaySettings
from protos.lorapool.v1 import admin_pb2, admin_pb2_grpc, generation_pb2, generation_pb2_grpc
from tests.serving.certs import make_certs
from tests.serving.fakes import FakeWorker, GatewayThread, StaticRegistry, wait_until
from tests.serving.redis_proc import RedisProcess

API, ADMIN = "api-token", "admin-token"
AUTH = (("authorization", f"Bearer {API}"),)
ADMIN_AUTH = (("authorization", f"Bearer {ADMIN}"),)


def settings(url: str, **kw: object) -> GatewaySettings:
    base: dict[str, object] = dict(
        listen="127.0.0.1:0",
        redis_url=url,
        api_tokens=(API,),
        admin_tokens=(ADMIN,),
        probe_interval_s=0.1,
        grace_s=5.0,
    )
    base.update(kw)
    return GatewaySettings(**base)  # type: ignore[arg-type]


@pytest.fixture
def registry() -> StaticRegistry:
    return StaticRegistry({"upper": AdapterRecord("upper", 1, "a" * 64)})


@pytest.fixture
def gateway(redis_url: str, registry: StaticRegistry) -> Iterator[GatewayThread]:
    gw = GatewayThread(settings(redis_url), registry)
    yield gw
    gw.stop()


@pytest.fixture
def worker(redis_url: str) -> Iterator[FakeWorker]:
    w = FakeWorker(redis_url)
    w.start()
    yield w
    w.halt()


def stub(gw: GatewayThread) -> generation_pb2_grpc.GenerationStub:
    return generation_pb2_grpc.GenerationStub(grpc.insecure_channel(gw.target))


def generate(
    gw: GatewayThread, timeout: float = 10, **fields: object
) -> list[generation_pb2.GenerateResponse]:
    request = generation_pb2.GenerateRequest(**fields)  # type: ignore[arg-type]
    return list(stub(gw).Generate(request, metadata=AUTH, timeout=timeout))


def status_of(gw: GatewayThread, **fields: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        generate(gw, **fields)
    return err.value.code()  # type: ignore[attr-defined, no-any-return]


def test_streams_in_order_and_ends_with_one_final(
    gateway: GatewayThread, worker: FakeWorker
) -> None:
    out = generate(gateway, adapter="upper", text="hello", request_id="r-1")
    deltas = [r.delta for r in out if r.HasField("delta")]
    assert "".join(d.text for d in deltas) == "HELLO"
    assert [d.seq for d in deltas] == [1, 2, 3, 4, 5]
    assert out[-1].HasField("final") and sum(r.HasField("final") for r in out) == 1
    assert out[-1].final.request_id == "r-1" and out[-1].final.completion_tokens == 5
    assert out[-1].final.time_to_first_token_s > 0
    assert worker.seen[-1].adapter_digest == "a" * 64


def test_auth_refuses_before_any_handler_work(
    gateway: GatewayThread, registry: StaticRegistry, redis_url: str
) -> None:
    request = generation_pb2.GenerateRequest(adapter="upper", text="hi")
    for metadata in [(), (("authorization", "Bearer nope"),), (("authorization", API),)]:
        with pytest.raises(grpc.RpcError) as err:
            list(stub(gateway).Generate(request, metadata=metadata, timeout=5))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    admin = admin_pb2_grpc.AdminStub(grpc.insecure_channel(gateway.target))
    with pytest.raises(grpc.RpcError) as err:
        admin.Get(admin_pb2.AdapterRef(ref="upper"), metadata=AUTH, timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert registry.lookups == 0
    assert redis.Redis.from_url(redis_url).get(keys.TOTAL) is None
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(gateway.target))
    reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


BAD = [
    (dict(text=""), grpc.StatusCode.INVALID_ARGUMENT, "text"),
    (dict(text="   "), grpc.StatusCode.INVALID_ARGUMENT, "text"),
    (dict(), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    (dict(text="x", sampling=dict(max_tokens=0)), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    (
        dict(text="x", sampling=dict(max_tokens=10**6)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "max_tokens",
    ),
    (
        dict(text="x", sampling=dict(temperature=math.nan)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "temperature",
    ),
    (dict(text="x", sampling=dict(top_p=0.0)), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (dict(text="x", sampling=dict(top_p=1.5)), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (dict(text="x", sampling=dict(stop=[""])), grpc.StatusCode.INVALID_ARGUMENT, "stop"),
    (
        dict(text="x", chat=dict(messages=[dict(role="god", content="x")])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "role",
    ),
    (dict(text="x" * 70_000), grpc.StatusCode.INVALID_ARGUMENT, "text"),
    (dict(text="x" * 5_000_000), grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    (dict(text="x", adapter="nope"), grpc.StatusCode.NOT_FOUND, "nope"),
    (dict(text="x", adapter="../../etc/passwd"), grpc.StatusCode.INVALID_ARGUMENT, "adapter"),
    (dict(text="x", adapter="a/b"), grpc.StatusCode.INVALID_ARGUMENT, "adapter"),
    (dict(text="x", request_id="bad id"), grpc.StatusCode.INVALID_ARGUMENT, "request_id"),
]


@pytest.mark.parametrize(("fields", "code", "word"), BAD)
def test_bad_requests_get_the_right_status_and_enqueue_nothing(
    gateway: GatewayThread,
    redis_url: str,
    fields: dict[str, object],
    code: grpc.StatusCode,
    word: str,
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        generate(gateway, **fields)
    assert err.value.code() == code
    assert word in (err.value.details() or "")
    assert redis.Redis.from_url(redis_url).get(keys.TOTAL) is None


def test_cancel_propagates_to_the_worker(
    gateway: GatewayThread, worker: FakeWorker, redis_url: str
) -> None:
    worker.delay_s = 0.05
    call = stub(gateway).Generate(
        generation_pb2.GenerateRequest(text="x" * 200, request_id="c-1"), metadata=AUTH, timeout=30
    )
    got = [next(call) for _ in range(3)]
    assert all(r.HasField("delta") for r in got)
    call.cancel()
    wait_until(lambda: "c-1" in worker.stopped_early, "the worker to stop c-1")
    assert worker.stopped_early == ["c-1"]


def test_deadline_exceeded_stops_the_worker(gateway: GatewayThread, worker: FakeWorker) -> None:
    worker.delay_s = 0.05
    with pytest.raises(grpc.RpcError) as err:
        generate(gateway, timeout=0.5, text="y" * 200, request_id="d-1")
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: "d-1" in worker.stopped_early, "the worker to stop d-1")
    assert worker.stopped_early == ["d-1"]


def test_overload_answers_resource_exhausted_at_once(
    redis_url: str, registry: StaticRegistry
) -> None:
    """Past the total bound, requests are refused before any worker has done anything."""
    gw = GatewayThread(
        settings(redis_url, queue_limits=Limits(max_depth_per_adapter=4, max_depth_total=6)),
        registry,
    )
    w = FakeWorker(redis_url, delay_s=0.002, claim=False)  # alive, but claims nothing yet
    w.start()
    try:

        def one(i: int) -> str:
            try:
                generate(gw, timeout=120, text="abcdefgh", request_id=f"o-{i}")
                return "ok"
            except grpc.RpcError as exc:
                return exc.code().name  # type: ignore[attr-defined, no-any-return]

        with ThreadPoolExecutor(32) as pool:
            futures = [pool.submit(one, i) for i in range(64)]
            # 60 of 64 (past the 4 per adapter) are answered while the worker has not
            # claimed a single job.
            wait_until(lambda: sum(f.done() for f in futures) == 60, "60 refusals")
            assert w.seen == []
            assert [f.result() for f in futures if f.done()] == ["RESOURCE_EXHAUSTED"] * 60
            w.claiming.set()
            codes = [f.result() for f in futures]
        assert codes.count("ok") == 4 and codes.count("RESOURCE_EXHAUSTED") == 60
    finally:
        w.halt()
        gw.stop()


def test_redis_outage_unavailable_fast_then_recovers(
    gateway: GatewayThread, worker: FakeWorker, redis_proc: RedisProcess
) -> None:
    assert generate(gateway, text="ok")[-1].HasField("final")
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(gateway.target))
    check = health_pb2.HealthCheckRequest(service="lorapool.v1.Generation")
    redis_proc.stop()
    # A hang would end in DEADLINE_EXCEEDED after the 10 s client timeout, not UNAVAILABLE.
    assert status_of(gateway, text="down") == grpc.StatusCode.UNAVAILABLE

    def status() -> object:
        return health.Check(check, timeout=10).status

    wait_until(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING, "NOT_SERVING")
    redis_proc.start()
    wait_until(lambda: status() == health_pb2.HealthCheckResponse.SERVING, "SERVING again")
    assert "".join(r.delta.text for r in generate(gateway, text="back")) == "BACK"


def test_registry_down_is_unavailable_not_a_hang(
    gateway: GatewayThread, registry: StaticRegistry
) -> None:
    registry.down = True
    # The registry hangs for 60 s; the client's 10 s timeout would say DEADLINE_EXCEEDED.
    assert status_of(gateway, text="x", adapter="upper:2") == grpc.StatusCode.UNAVAILABLE


def test_admin_upload_get_delete(gateway: GatewayThread, registry: StaticRegistry) -> None:
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        for name, data in [("a/adapter_config.json", b"{}"), ("a/adapter_model.safetensors", b"x")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    blob = archive.getvalue()
    chunks = [admin_pb2.UploadChunk(header=admin_pb2.UploadHeader(name="new", description="d"))]
    chunks += [admin_pb2.UploadChunk(data=blob[i : i + 100]) for i in range(0, len(blob), 100)]
    admin = admin_pb2_grpc.AdminStub(grpc.insecure_channel(gateway.target))
    info = admin.Upload(iter(chunks), metadata=ADMIN_AUTH, timeout=10)
    assert info.name == "new" and info.description == "d"
    assert admin.Get(admin_pb2.AdapterRef(ref="new"), metadata=ADMIN_AUTH, timeout=5).name == "new"
    listed = stub(gateway).ListAdapters(
        generation_pb2.ListAdaptersRequest(), metadata=AUTH, timeout=5
    )
    assert {a.name for a in listed.adapters} == {"upper", "new"}
    admin.Delete(admin_pb2.AdapterRef(ref="new"), metadata=ADMIN_AUTH, timeout=5)
    with pytest.raises(grpc.RpcError) as err:
        admin.Get(admin_pb2.AdapterRef(ref="new"), metadata=ADMIN_AUTH, timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        admin.Upload(
            iter(chunks[:1] + [admin_pb2.UploadChunk(data=b"not a tar")]),
            metadata=ADMIN_AUTH,
            timeout=5,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_graceful_shutdown_lets_open_streams_finish(
    redis_url: str, registry: StaticRegistry
) -> None:
    gw = GatewayThread(settings(redis_url), registry)
    w = FakeWorker(redis_url, delay_s=0.02)
    w.start()
    try:
        call = stub(gw).Generate(
            generation_pb2.GenerateRequest(text="z" * 40), metadata=AUTH, timeout=20
        )
        first = next(call)
        stopper = ThreadPoolExecutor(1).submit(gw.stop)
        rest = list(call)
        stopper.result(10)
        assert first.HasField("delta") and rest[-1].HasField("final")
    finally:
        w.halt()


def test_settings_refuse_open_non_loopback() -> None:
    with pytest.raises(ValueError, match="without API tokens"):
        GatewaySettings(listen="0.0.0.0:50051")
    with pytest.raises(ValueError, match="without API tokens"):  # admin tokens leave Generate open
        GatewaySettings(listen="0.0.0.0:50051", admin_tokens=("a",))
    GatewaySettings(listen="0.0.0.0:50051", admin_tokens=("a",), insecure=True)
    GatewaySettings(listen="0.0.0.0:50051", insecure=True)
    GatewaySettings(listen="0.0.0.0:50051", api_tokens=("t",))
    GatewaySettings(listen="[::1]:50051")


def test_tls_and_mtls(
    redis_url: str, registry: StaticRegistry, worker: FakeWorker, tmp_path: Path
) -> None:
    c = make_certs(tmp_path)
    gw = GatewayThread(
        settings(
            redis_url, tls_cert=c["server_pem"], tls_key=c["server_key"], tls_client_ca=c["ca_pem"]
        ),
        registry,
    )
    try:
        request = generation_pb2.GenerateRequest(text="tls")
        ca = c["ca_pem"].read_bytes()
        with_cert = grpc.ssl_channel_credentials(
            ca, c["client_key"].read_bytes(), c["client_pem"].read_bytes()
        )
        stub_ok = generation_pb2_grpc.GenerationStub(grpc.secure_channel(gw.target, with_cert))
        assert (
            "".join(r.delta.text for r in stub_ok.Generate(request, metadata=AUTH, timeout=10))
            == "TLS"
        )
        no_cert = generation_pb2_grpc.GenerationStub(
            grpc.secure_channel(gw.target, grpc.ssl_channel_credentials(ca))
        )
        with pytest.raises(grpc.RpcError) as err:
            list(no_cert.Generate(request, metadata=AUTH, timeout=5))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # handshake refused
        plain = generation_pb2_grpc.GenerationStub(grpc.insecure_channel(gw.target))
        with pytest.raises(grpc.RpcError):
            list(plain.Generate(request, metadata=AUTH, timeout=5))
        _generate_cli_with_mtls(gw.target, c)
    finally:
        gw.stop()


def _generate_cli_with_mtls(target: str, c: dict[str, Path]) -> None:
    """`lorapool generate` presents a client certificate with --tls-cert/--tls-key."""
    import argparse

    from lorapool import client

    parser = argparse.ArgumentParser()
    client.add_arguments(parser)
    token = AUTH[0][1].split()[1]
    common = ["--raw", "tls", "--target", target, "--tls-ca", str(c["ca_pem"]), "--token", token]
    with_cert = ["--tls-cert", str(c["client_pem"]), "--tls-key", str(c["client_key"])]
    assert client.run(parser.parse_args(common + with_cert)) == 0
    assert client.run(parser.parse_args(common)) == 1 + grpc.StatusCode.UNAVAILABLE.value[0]


def test_reflection_lists_the_services(gateway: GatewayThread) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    services = set(
        ProtoReflectionDescriptorDatabase(grpc.insecure_channel(gateway.target)).get_services()
    )
    assert {"lorapool.v1.Generation", "lorapool.v1.Admin", "grpc.health.v1.Health"} <= services
