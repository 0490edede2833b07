"""The gateway on the real registry (SQLite index, local blobs): admin upload to generate."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from adapter_store.basemodel import BaseModelSpec
from adapter_store.blobs import LocalBlobStore
from adapter_store.db import make_engine, make_session_factory, upgrade
from gateway.store import StoreRegistry
from protos.lorapool.v1 import admin_pb2, admin_pb2_grpc, generation_pb2, generation_pb2_grpc
from tests.adapter_store.builders import write_lora
from tests.serving.fakes import FakeWorker, GatewayThread
from tests.serving.redis_proc import free_port
from tests.serving.test_gateway import ADMIN_AUTH, AUTH, settings


@pytest.fixture(scope="module")
def base_dir() -> Path:
    from worker.config import default_cache_dir
    from worker.model.source import DEFAULT_MODEL, resolve_model_dir

    return resolve_model_dir(DEFAULT_MODEL, default_cache_dir())


def store_registry(tmp: Path, base_dir: Path, url: str | None = None) -> StoreRegistry:
    url = url or f"sqlite:///{tmp / 'registry.sqlite3'}"
    if url.startswith("sqlite"):
        upgrade(url)
    return StoreRegistry(
        make_session_factory(make_engine(url)), LocalBlobStore(tmp / "blobs"), base_dir, 64
    )


@pytest.fixture
def gateway(redis_url: str, tmp_path: Path, base_dir: Path) -> Iterator[GatewayThread]:
    gw = GatewayThread(
        settings(redis_url, registry_cache_s=0.0), store_registry(tmp_path, base_dir)
    )  # type: ignore[arg-type]
    yield gw
    gw.stop()


def tar_of(directory: Path) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        tar.add(directory, arcname="adapter")
    return out.getvalue()


def upload(gw: GatewayThread, name: str, data: bytes) -> generation_pb2.AdapterInfo:
    chunks = [admin_pb2.UploadChunk(header=admin_pb2.UploadHeader(name=name))]
    chunks += [admin_pb2.UploadChunk(data=data[i : i + 65536]) for i in range(0, len(data), 65536)]
    stub = admin_pb2_grpc.AdminStub(grpc.insecure_channel(gw.target))
    return stub.Upload(iter(chunks), metadata=ADMIN_AUTH, timeout=60)  # type: ignore[no-any-return]


def test_upload_generate_delete(
    gateway: GatewayThread, redis_url: str, tmp_path: Path, base_dir: Path
) -> None:
    adapter = write_lora(tmp_path / "lora", BaseModelSpec.from_hf_dir(base_dir))
    info = upload(gateway, "tiny", tar_of(adapter))
    assert (info.name, info.version, info.status) == ("tiny", 1, "READY") and len(info.digest) == 64
    worker = FakeWorker(redis_url)
    worker.start()
    try:
        stub = generation_pb2_grpc.GenerationStub(grpc.insecure_channel(gateway.target))
        request = generation_pb2.GenerateRequest(adapter="tiny:1", text="ok")
        assert (
            "".join(r.delta.text for r in stub.Generate(request, metadata=AUTH, timeout=60)) == "OK"
        )
        assert worker.seen[-1].adapter_digest == info.digest
        admin = admin_pb2_grpc.AdminStub(grpc.insecure_channel(gateway.target))
        admin.Delete(admin_pb2.AdapterRef(ref="tiny"), metadata=ADMIN_AUTH, timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(request, metadata=AUTH, timeout=10))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        worker.halt()


def test_upload_runs_the_registry_validation(
    gateway: GatewayThread, tmp_path: Path, base_dir: Path
) -> None:
    adapter = write_lora(tmp_path / "lora", BaseModelSpec.from_hf_dir(base_dir))
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    with pytest.raises(grpc.RpcError) as err:
        upload(gateway, "pickled", tar_of(adapter))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "pickle" in (err.value.details() or "").lower() or ".bin" in (err.value.details() or "")


def test_registry_down_is_unavailable_fast(redis_url: str, tmp_path: Path, base_dir: Path) -> None:
    dead = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none?connect_timeout=1"
    gw = GatewayThread(settings(redis_url), store_registry(tmp_path, base_dir, dead))  # type: ignore[arg-type]
    try:
        stub = generation_pb2_grpc.GenerationStub(grpc.insecure_channel(gw.target))
        with pytest.raises(grpc.RpcError) as err:
            list(
                stub.Generate(
                    generation_pb2.GenerateRequest(adapter="x", text="hi"),
                    metadata=AUTH,
                    timeout=60,
                )
            )
        # A hang would end in DEADLINE_EXCEEDED after the client's 60 s.
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        gw.stop()
