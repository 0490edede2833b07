"""Both blob backends: content addressing, idempotent puts, verified reads, ages."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer
from sqlalchemy.orm import Session, sessionmaker

from adapter_store.basemodel import BaseModelSpec
from adapter_store.blobs import BlobStore, LocalBlobStore, open_blob_store
from adapter_store.collector import collect_garbage
from adapter_store.errors import BlobCorrupt, BlobNotFound, InvalidDigest
from adapter_store.s3blobs import S3BlobStore
from adapter_store.settings import StoreSettings
from adapter_store.upload import upload_adapter
from tests.adapter_store.builders import write_lora
from tests.adapter_store.conftest import _free_port

BUCKET = "lorapool-test"


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def s3_settings(endpoint: str, tmp_path: Path, prefix: str) -> StoreSettings:
    return StoreSettings.from_env(
        {},
        data_dir=tmp_path,
        blob_url=f"s3://{BUCKET}/{prefix}",
        s3_endpoint_url=endpoint,
        s3_access_key_id="testing",
        s3_secret_access_key="testing",
        s3_region="us-east-1",
    )


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    if request.param == "local":
        return LocalBlobStore(tmp_path / "blobs")
    endpoint = request.getfixturevalue("moto_endpoint")
    settings = s3_settings(endpoint, tmp_path, f"p{time.monotonic_ns()}")
    s3 = open_blob_store(settings)
    assert isinstance(s3, S3BlobStore)
    ensure_bucket(s3.client)
    return s3


def ensure_bucket(client: object) -> None:
    names = {b["Name"] for b in client.list_buckets()["Buckets"]}  # type: ignore[attr-defined]
    if BUCKET not in names:
        client.create_bucket(Bucket=BUCKET)  # type: ignore[attr-defined]


def corrupt(store: BlobStore, digest: str) -> None:
    if isinstance(store, LocalBlobStore):
        store.path_for(digest).write_bytes(b"tampered")
    else:
        assert isinstance(store, S3BlobStore)
        store.client.put_object(Bucket=store.bucket, Key=store._key(digest), Body=b"tampered")


def test_put_get_roundtrip_and_idempotent(store: BlobStore, tmp_path: Path) -> None:
    data = os.urandom(3000)
    digest = store.put(data)
    assert digest == hashlib.sha256(data).hexdigest()
    source = tmp_path / "source.bin"
    source.write_bytes(data)
    assert store.put(source) == digest
    assert store.get(digest) == data
    assert store.exists(digest)
    assert list(store.list_digests()) == [digest]
    dest = tmp_path / "out" / "adapter.safetensors"
    store.fetch_to(digest, dest)
    assert dest.read_bytes() == data


def test_missing_and_invalid_digests(store: BlobStore, tmp_path: Path) -> None:
    missing = "0" * 64
    assert not store.exists(missing)
    with pytest.raises(BlobNotFound):
        store.get(missing)
    with pytest.raises(BlobNotFound):
        store.fetch_to(missing, tmp_path / "x")
    with pytest.raises(InvalidDigest):
        store.get("../../etc/passwd")
    store.delete(missing)


def test_reads_verify_the_digest(store: BlobStore, tmp_path: Path) -> None:
    digest = store.put(b"adapter bytes")
    corrupt(store, digest)
    with pytest.raises(BlobCorrupt):
        store.get(digest)
    dest = tmp_path / "dest.safetensors"
    with pytest.raises(BlobCorrupt):
        store.fetch_to(digest, dest)
    assert not dest.exists()
    assert list(dest.parent.glob(".dest*")) == []


def test_delete_and_age(store: BlobStore) -> None:
    first, second = store.put(b"one"), store.put(b"two")
    assert 0 <= store.age(first) < 60
    store.delete(first)
    assert not store.exists(first)
    assert list(store.list_digests()) == [second]
    with pytest.raises(BlobNotFound):
        store.age(first)


def test_local_layout_and_reput_refreshes_age(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    digest = store.put(b"blob")
    path = tmp_path / "sha256" / digest[:2] / digest[2:]
    assert path.read_bytes() == b"blob"
    os.utime(path, (time.time() - 7200, time.time() - 7200))
    assert store.age(digest) > 7000
    store.put(b"blob")
    assert store.age(digest) < 60
    assert list((tmp_path / "tmp").iterdir()) == []


def test_s3_settings_select_the_s3_backend(moto_endpoint: str, tmp_path: Path) -> None:
    settings = s3_settings(moto_endpoint, tmp_path, "deploy/blobs")
    store = open_blob_store(settings)
    assert isinstance(store, S3BlobStore)
    assert (store.bucket, store.prefix) == (BUCKET, "deploy/blobs")
    client = boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    ensure_bucket(client)
    digest = store.put(b"x")
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="deploy/")["Contents"]]
    assert keys == [f"deploy/blobs/sha256/{digest[:2]}/{digest[2:]}"]


def test_upload_and_gc_against_s3(
    moto_endpoint: str,
    tmp_path: Path,
    committed_factory: sessionmaker[Session],
    tiny_base: BaseModelSpec,
    unique_name: str,
) -> None:
    store = open_blob_store(s3_settings(moto_endpoint, tmp_path, f"gc-{unique_name}"))
    assert isinstance(store, S3BlobStore)
    ensure_bucket(store.client)
    seed = int(unique_name.rsplit("-", 1)[1], 16) % 2**31
    directory = write_lora(tmp_path / "a", tiny_base, seed=seed)
    adapter = upload_adapter(
        committed_factory, store, directory, unique_name, base=tiny_base, max_rank=16
    )
    orphan = store.put(b"orphan")
    report = collect_garbage(committed_factory, store, grace_s=0)
    assert report.deleted == [orphan]
    assert list(store.list_digests()) == [adapter.digest]
    store.fetch_to(adapter.digest, tmp_path / "worker" / "adapter.safetensors")
    assert (tmp_path / "worker" / "adapter.safetensors").stat().st_size == adapter.size_bytes


def test_blob_backends_form_no_import_cycle() -> None:
    """s3blobs shares blobkeys with blobs and never imports blobs (blobs imports s3blobs
    lazily in its factory); the factory stays importable from adapter_store.blobs."""
    import grimp

    graph = grimp.build_graph("adapter_store")
    assert graph.find_shortest_chain("adapter_store.s3blobs", "adapter_store.blobs") is None
    assert graph.find_shortest_chain("adapter_store.blobkeys", "adapter_store.blobs") is None
    assert callable(open_blob_store)
