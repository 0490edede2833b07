"""Upload archives on disk: spooled off the event loop, unpacked within bounds.

An upload is a tar (any compression) of one PEFT directory. Only regular files and
directories are extracted; links, devices and fifos are refused. The archive may hold at
most `max_files` members and `max_extracted_bytes` in all (by the sizes in the headers,
checked before each member is written, so a tar bomb stops at its first oversized
member). All file work runs on one thread per upload, in order, so cleaning up after a
refusal or a cancel runs after the last write: nothing is left behind.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

from gateway.errors import UploadRejected

CONFIG_FILE = "adapter_config.json"
T = TypeVar("T")


@dataclass(frozen=True)
class UploadLimits:
    max_upload_bytes: int = 512 * 1024**2  # the archive as sent (compressed)
    max_extracted_bytes: int = 2 * 1024**3  # all files after extraction
    max_files: int = 64  # members (files and directories)
    directory: Path | None = None  # where uploads are spooled; None: the system temp dir

    def __post_init__(self) -> None:
        if min(self.max_upload_bytes, self.max_extracted_bytes, self.max_files) < 1:
            raise ValueError("upload limits must be >= 1")


def _check_member(member: tarfile.TarInfo, count: int, total: int, limits: UploadLimits) -> None:
    name = Path(member.name)
    if name.is_absolute() or ".." in name.parts:
        raise UploadRejected(f"{member.name!r}: names must stay inside the archive")
    if count > limits.max_files:
        raise UploadRejected(f"the archive holds more than {limits.max_files} entries")
    if not (member.isfile() or member.isdir()):
        raise UploadRejected(f"{member.name!r}: only regular files and directories are allowed")
    if total > limits.max_extracted_bytes:
        raise UploadRejected(f"the archive unpacks to more than {limits.max_extracted_bytes} bytes")


def unpack(archive: Path, into: Path, limits: UploadLimits) -> Path:
    """Extract `archive` into `into` within `limits`; return the directory of the adapter."""
    count = total = 0
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            for member in tar:
                count += 1
                total += max(member.size, 0) if member.isfile() else 0
                _check_member(member, count, total, limits)
                _extract(tar, member, into)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UploadRejected(f"not a readable tar archive: {exc}") from exc
    found = sorted(p.parent for p in into.rglob(CONFIG_FILE))
    if len(found) != 1:
        raise UploadRejected(f"the archive must hold exactly one {CONFIG_FILE}, found {len(found)}")
    return found[0]


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, into: Path) -> None:
    """Extract one checked member. Python ≥ 3.11.4 (and 3.12) has the "data" filter; before
    it (Debian bookworm's 3.11.2) _check_member's checks stand in for it and no mode bit
    beyond rwxr-xr-x survives."""
    if hasattr(tarfile, "data_filter"):
        tar.extract(member, into, filter="data")
    else:
        member.mode &= 0o755
        tar.extract(member, into)


class Spool:
    """One upload's scratch directory and the single thread that touches it."""

    def __init__(self, limits: UploadLimits) -> None:
        self.limits = limits
        self._thread = concurrent.futures.ThreadPoolExecutor(1, "lorapool-upload")
        self._opened = self._thread.submit(self._open)

    def _open(self) -> tuple[Path, BinaryIO]:
        root = Path(tempfile.mkdtemp(prefix="lorapool-upload-", dir=self.limits.directory))
        return root, (root / "upload.tar").open("wb")

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.wrap_future(self._thread.submit(fn, *args))

    async def write(self, data: bytes) -> None:
        _, out = await asyncio.wrap_future(self._opened)
        await self._run(out.write, data)

    async def unpack(self) -> Path:
        root, out = await asyncio.wrap_future(self._opened)
        await self._run(out.close)
        return await self._run(unpack, root / "upload.tar", root / "x", self.limits)

    async def close(self) -> None:
        """Remove everything, after any write or extraction still queued on the thread."""
        done = self._thread.submit(self._remove)
        self._thread.shutdown(wait=False)
        await asyncio.shield(asyncio.wrap_future(done))

    def _remove(self) -> None:
        if self._opened.exception() is not None:
            return  # nothing was created
        root, out = self._opened.result()
        out.close()
        shutil.rmtree(root, ignore_errors=True)
