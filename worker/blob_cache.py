"""The worker's local adapter blob cache: digest → a verified local file, within a byte budget.

    get(digest)   the local file, pinned; None while a background fetch runs; raises
                  AdapterFetchError when the blob cannot be fetched or is malformed
    trim(in_use)  unpin what is no longer in use, then evict the least recently used blobs
                  until the cache fits its budget; returns the digests evicted

Fetches run on a small thread pool, so a cold adapter never stalls the step loop; the index,
pins and evictions live on the caller's thread. A blob in use is never evicted, even when
the blobs in use alone exceed the budget. At start the index is rebuilt from the directory
(least recently used first, by modification time), so files of an earlier run count too.

Workers on one host may share the directory (blobs are content-addressed): each holds a
shared flock on the blobs it has pinned and evicts only a blob it can lock exclusively, so
no worker evicts a blob another one is using.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Set
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from adapter_store.blobs import check_digest
from adapter_store.errors import AdapterStoreError
from adapter_store.tensorfile import open_header
from adapter_store.validation import CONFIG_METADATA_KEY

if TYPE_CHECKING:
    from adapter_store.blobs import BlobStore

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"
STALE_PART_S = 3600.0  # a partial download this old was left by a crashed fetch
FAILURE_MEMORY_S = 5.0  # a failed fetch answers every job for its blob this long, then retries


class AdapterBlobs(Protocol):
    """What the service loop needs of local adapter blobs (BlobCache below)."""

    used_bytes: int

    def get(self, digest: str) -> Path | None: ...

    def trim(self, in_use: Set[str]) -> set[str]: ...


class AdapterFetchError(Exception):
    """An adapter blob could not be fetched, verified or loaded: its jobs fail, nothing else."""


def check_blob(path: Path) -> None:
    """Refuse a blob the engine could not read: not safetensors, or no adapter config object."""
    try:
        text = open_header(path).metadata.get(CONFIG_METADATA_KEY)
        config = json.loads(text) if text is not None else None
    except (AdapterStoreError, OSError, ValueError) as exc:
        raise AdapterFetchError(f"adapter blob is malformed: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterFetchError(f"adapter blob carries no {CONFIG_METADATA_KEY} JSON object")


class BlobCache:
    def __init__(
        self,
        blobs: BlobStore,
        root: Path,
        budget_bytes: int,
        observe: Callable[[float], None],
        fetchers: int = 2,
    ) -> None:
        if budget_bytes < 1:
            raise ValueError(f"the adapter cache budget must be positive, got {budget_bytes}")
        root.mkdir(parents=True, exist_ok=True)
        self.budget_bytes = budget_bytes
        self.used_bytes = 0  # bytes of the indexed blobs
        self._blobs = blobs
        self._root = root
        self._observe = observe  # fetch durations, for the adapter load-time histogram
        self._pool = ThreadPoolExecutor(fetchers, thread_name_prefix="blob-fetch")
        self._fetching: dict[str, Future[int]] = {}  # digest → its size once fetched
        self._failed: dict[str, tuple[float, str]] = {}  # digest → (when, message)
        self._index: OrderedDict[str, int] = OrderedDict()  # digest → bytes, LRU first
        self._pins: dict[str, int] = {}  # digest → a descriptor holding a shared flock
        self._rebuild()

    def path(self, digest: str) -> Path:
        return self._root / f"{digest}{SUFFIX}"

    def __contains__(self, digest: str) -> bool:
        return digest in self._index

    @property
    def fetching(self) -> int:
        """Fetches running or queued."""
        return len(self._fetching)

    def get(self, digest: str) -> Path | None:
        """The blob's local file, pinned until a trim() without it; None while fetching."""
        try:
            check_digest(digest)
        except AdapterStoreError as exc:
            raise AdapterFetchError(f"bad adapter digest: {exc}") from exc
        future = self._fetching.get(digest)
        if future is not None and future.done():
            self._harvest(digest, future)
        failed = self._failed.get(digest)
        if failed is not None and time.monotonic() - failed[0] < FAILURE_MEMORY_S:
            raise AdapterFetchError(failed[1])
        if self._pin(digest):
            if digest not in self._index:  # a neighbour worker fetched it
                self._add(digest, self.path(digest).stat().st_size)
            self._index.move_to_end(digest)
            return self.path(digest)
        self._forget(digest)  # not on disk (any more)
        if digest not in self._fetching:
            self._fetching[digest] = self._pool.submit(self._fetch, digest)
        return None

    def trim(self, in_use: Set[str]) -> set[str]:
        """Unpin what is not in `in_use`, then evict least recently used blobs to the budget."""
        for digest in [d for d in self._pins if d not in in_use]:
            os.close(self._pins.pop(digest))  # closing releases the flock
        for digest in in_use & self._index.keys():
            self._index.move_to_end(digest)
        self._tidy(in_use)
        evicted: set[str] = set()
        for digest in list(self._index):
            if self.used_bytes <= self.budget_bytes:
                break
            if digest in in_use or digest in self._pins:
                continue
            if self._evict(digest):
                evicted.add(digest)
            else:  # a neighbour uses it: try the others first next time
                self._index.move_to_end(digest)
        return evicted

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        for fd in self._pins.values():
            os.close(fd)
        self._pins.clear()

    def _tidy(self, in_use: Set[str]) -> None:
        """Collect finished fetches, cancel queued ones nobody waits for, expire failures."""
        for digest, future in list(self._fetching.items()):
            if future.done():
                self._harvest(digest, future)
            elif digest not in in_use and future.cancel():
                del self._fetching[digest]
        now = time.monotonic()
        for digest in [
            d for d, (when, _) in self._failed.items() if now - when >= FAILURE_MEMORY_S
        ]:
            del self._failed[digest]

    def _harvest(self, digest: str, future: Future[int]) -> None:
        del self._fetching[digest]
        try:
            size = future.result()
            # get() may have indexed the file already (it was linked into place before the
            # future completed): re-adding would move it to the most-recently-used end.
            if digest not in self._index:
                self._add(digest, size)
            self._failed.pop(digest, None)
        except AdapterFetchError as exc:
            self._fail(digest, f"adapter {digest[:12]}: {exc}", exc)
        # The store's client may raise anything (botocore, urllib3, OSError, the store's own
        # errors); the failure belongs to this blob's jobs, never to the process.
        except Exception as exc:  # noqa: BLE001
            self._fail(digest, f"adapter {digest[:12]} could not be fetched: {exc}", exc)

    def _fail(self, digest: str, message: str, exc: Exception) -> None:
        log.warning("%s", message, exc_info=exc)
        self._failed[digest] = (time.monotonic(), message)

    def _fetch(self, digest: str) -> int:
        """On a pool thread: download, verify and link the blob into place; its size."""
        t0 = time.perf_counter()
        tmp = self._root / f".{digest}.{uuid.uuid4().hex}.part"
        try:
            self._blobs.fetch_to(digest, tmp)  # verifies the sha256
            check_blob(tmp)
            size = tmp.stat().st_size
            # Observed before the link: once the file is in place, get() may hand it out
            # before this future completes, and the fetch must already be on record.
            self._observe(time.perf_counter() - t0)
            try:
                os.link(tmp, self.path(digest))  # never replaces a neighbour's pinned copy
            except FileExistsError:
                pass  # a neighbour fetched the same bytes first
        finally:
            tmp.unlink(missing_ok=True)
        return size

    def _pin(self, digest: str) -> bool:
        """Hold a shared flock on the blob's file; False when it is not there to hold."""
        if digest in self._pins:
            return True
        path = self.path(digest)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # a neighbour is evicting it right now
            os.close(fd)
            return False
        if not _same_file(fd, path):  # evicted between our open and our lock
            os.close(fd)
            return False
        self._pins[digest] = fd
        os.utime(path)  # so the next start's index orders blobs by their last use
        return True

    def _evict(self, digest: str) -> bool:
        """Delete the blob unless a neighbour holds it; True once it is gone."""
        path = self.path(digest)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            self._forget(digest)
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _same_file(fd, path):
                path.unlink()
        except BlockingIOError:
            return False
        finally:
            os.close(fd)
        self._forget(digest)
        return True

    def _add(self, digest: str, size: int) -> None:
        self._forget(digest)
        self._index[digest] = size
        self.used_bytes += size

    def _forget(self, digest: str) -> None:
        self.used_bytes -= self._index.pop(digest, 0)

    def _rebuild(self) -> None:
        """Index the blobs already on disk, least recently used first; drop stale partials."""
        found: list[tuple[float, str, int]] = []
        now = time.time()
        for path in self._root.iterdir():
            try:
                stat = path.stat()
                if path.name.startswith("."):  # a partial download (ours or the store's)
                    if now - stat.st_mtime > STALE_PART_S:
                        path.unlink()
                elif path.name.endswith(SUFFIX):
                    digest = check_digest(path.name.removesuffix(SUFFIX))
                    found.append((stat.st_mtime, digest, stat.st_size))
            except FileNotFoundError:  # a neighbour removed it meanwhile
                continue
            except AdapterStoreError:  # not one of ours
                continue
        for _, digest, size in sorted(found):
            self._add(digest, size)
        log.info(
            "adapter cache %s: %d blobs, %d of %d bytes",
            self._root,
            len(self._index),
            self.used_bytes,
            self.budget_bytes,
        )


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), path.stat())
    except FileNotFoundError:
        return False
