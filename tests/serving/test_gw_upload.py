"""Upload bounds: tar bombs, too many files and links are refused and leave nothing behind."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from gateway.unpack import UploadLimits
from protos.lorapool.v1 import admin_pb2, admin_pb2_grpc
from tests.serving.fakes import GatewayThread, StaticRegistry
from tests.serving.test_gateway import ADMIN_AUTH, settings

MiB = 1024 * 1024


def archive(add: Callable[[tarfile.TarFile], None], mode: str = "w:gz") -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode=mode) as tar:  # type: ignore[call-overload]
        add(tar)
    return out.getvalue()


def put(tar: tarfile.TarFile, name: str, data: bytes | io.IOBase, size: int | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data) if isinstance(data, bytes) else int(size or 0)
    tar.addfile(info, io.BytesIO(data) if isinstance(data, bytes) else data)


class Zeros(io.RawIOBase):
    def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
        buffer[:] = bytes(len(buffer))
        return len(buffer)


def adapter(tar: tarfile.TarFile) -> None:
    put(tar, "a/adapter_config.json", b"{}")
    put(tar, "a/adapter_model.safetensors", b"x")


def zero_bomb(tar: tarfile.TarFile) -> None:
    put(tar, "a/adapter_config.json", b"{}")
    put(tar, "a/adapter_model.safetensors", Zeros(), size=16 * MiB)  # ~16 KiB compressed


def many_files(tar: tarfile.TarFile) -> None:
    adapter(tar)
    for i in range(1000):
        put(tar, f"a/f{i}", b"")


def link(kind: bytes) -> Callable[[tarfile.TarFile], None]:
    def add(tar: tarfile.TarFile) -> None:
        adapter(tar)
        info = tarfile.TarInfo("a/extra")
        info.type = kind
        info.linkname = "a/adapter_config.json"
        tar.addfile(info)

    return add


def claims_3_gib(tar: tarfile.TarFile) -> None:
    """A header declaring a 3 GiB member and no data: refused by the default bound alone."""
    info = tarfile.TarInfo("a/adapter_model.safetensors")
    info.size = 3 * 1024**3
    tar.fileobj.write(info.tobuf(tar.format, tar.encoding, tar.errors))  # type: ignore[union-attr]


def upload(gw: GatewayThread, data: bytes) -> admin_pb2.UploadChunk:
    chunks = [admin_pb2.UploadChunk(header=admin_pb2.UploadHeader(name="bomb"))]
    chunks += [admin_pb2.UploadChunk(data=data[i : i + MiB]) for i in range(0, len(data), MiB)]
    admin = admin_pb2_grpc.AdminStub(grpc.insecure_channel(gw.target))
    return admin.Upload(iter(chunks), metadata=ADMIN_AUTH, timeout=60)  # type: ignore[no-any-return]


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    path = tmp_path / "uploads"
    path.mkdir()
    return path


def gateway_with(redis_url: str, limits: UploadLimits) -> GatewayThread:
    return GatewayThread(settings(redis_url, upload_limits=limits), StaticRegistry())


@pytest.fixture
def gateway(redis_url: str, spool: Path) -> Iterator[GatewayThread]:
    gw = gateway_with(redis_url, UploadLimits(max_extracted_bytes=MiB, directory=spool))
    yield gw
    gw.stop()


REFUSED = [
    (zero_bomb, "unpacks to more than"),
    (many_files, "more than 64 entries"),
    (link(tarfile.SYMTYPE), "only regular files"),
    (link(tarfile.LNKTYPE), "only regular files"),
    (link(tarfile.CHRTYPE), "only regular files"),
    (link(tarfile.FIFOTYPE), "only regular files"),
]


@pytest.mark.parametrize(("build", "why"), REFUSED)
def test_bad_archives_are_refused_and_leave_nothing(
    gateway: GatewayThread, spool: Path, build: Callable[[tarfile.TarFile], None], why: str
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        upload(gateway, archive(build))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert why in (err.value.details() or "")
    assert list(spool.iterdir()) == []


def test_a_good_archive_passes_and_leaves_nothing(gateway: GatewayThread, spool: Path) -> None:
    assert upload(gateway, archive(adapter)).name == "bomb"
    assert list(spool.iterdir()) == []


def test_default_bound_refuses_a_member_declared_past_2_gib(redis_url: str, spool: Path) -> None:
    gw = gateway_with(redis_url, UploadLimits(directory=spool))
    try:
        with pytest.raises(grpc.RpcError) as err:
            upload(gw, archive(claims_3_gib, mode="w"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "unpacks to more than 2147483648 bytes" in (err.value.details() or "")
        assert list(spool.iterdir()) == []
    finally:
        gw.stop()


@pytest.mark.parametrize("has_data_filter", [True, False])
def test_unpack_without_pythons_data_filter(
    has_data_filter: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python before 3.11.4 (Debian bookworm's 3.11.2) has no extraction filters: our own
    checks refuse names that leave the archive, and a good archive still unpacks."""
    from gateway.errors import UploadRejected
    from gateway.unpack import unpack

    if not has_data_filter:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)

    def archive(path: Path, members: dict[str, bytes]) -> Path:
        with tarfile.open(path, "w") as tar:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), 0o6777  # setuid bits must not survive
                tar.addfile(info, io.BytesIO(data))
        return path

    good = archive(tmp_path / "good.tar", {"a/adapter_config.json": b"{}", "a/w": b"x"})
    found = unpack(good, tmp_path / "good", UploadLimits())
    assert (found / "adapter_config.json").read_bytes() == b"{}"
    assert (found / "w").stat().st_mode & 0o7000 == 0
    for name in ("../escape", "/etc/escape", "a/../../escape"):
        bad = archive(tmp_path / "bad.tar", {name: b"x"})
        with pytest.raises(UploadRejected, match="inside the archive"):
            unpack(bad, tmp_path / "bad", UploadLimits())
    assert not (tmp_path / "escape").exists()
