"""The worker's adapter blob cache: background fetches, byte budget, LRU, pins, restarts."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from adapter_store.blobs import LocalBlobStore
from tests.serving.test_worker_fakes import blob, wait_until
from worker import blob_cache
from worker.blob_cache import AdapterFetchError, BlobCache

SIZE = len(blob(size=1024))  # bytes of one test blob


def _blobs(store: LocalBlobStore, n: int) -> list[str]:
    return [store.put(blob(f'{{"peft_type": "LORA", "r": {i + 1}}}', 1024)) for i in range(n)]


def _get(cache: BlobCache, digest: str) -> Path:
    """Ask until the background fetch is done (as the service loop does every tick)."""
    found: list[Path] = []
    wait_until(lambda: bool(found), lambda: found.extend(p for p in [cache.get(digest)] if p))
    return found[0]


def _on_disk(root: Path) -> set[str]:
    return {p.name.removesuffix(".safetensors") for p in root.glob("*.safetensors")}


@pytest.fixture
def store(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "store")


def test_fetches_in_the_background_and_verifies(tmp_path: Path, store: LocalBlobStore) -> None:
    [digest] = _blobs(store, 1)
    seen: list[float] = []
    cache = BlobCache(store, tmp_path / "cache", 1 << 20, seen.append)
    path = _get(cache, digest)
    assert path.read_bytes() == store.get(digest) and len(seen) == 1
    assert cache.get(digest) == path and len(seen) == 1  # cached: no second fetch
    for bad in ("../../etc/passwd", "0" * 64):
        with pytest.raises(AdapterFetchError):
            wait_until(lambda bad=bad: cache.get(bad) is not None)
    cache.close()


def test_evicts_the_least_recently_used_first(tmp_path: Path, store: LocalBlobStore) -> None:
    a, b, c, d = _blobs(store, 4)
    root = tmp_path / "cache"
    cache = BlobCache(store, root, 3 * SIZE, lambda _s: None)
    for digest in (a, b, c):
        _get(cache, digest)
        assert cache.trim({digest}) == set()  # in use while its job runs; within budget
    assert cache.used_bytes == 3 * SIZE
    _get(cache, a)  # a is used again: b is now the least recently used
    cache.trim({a})
    _get(cache, d)
    assert cache.trim({d}) == {b}
    assert _on_disk(root) == {a, c, d} and cache.used_bytes == 3 * SIZE
    assert b not in cache
    assert _get(cache, b).is_file()  # fetched again when needed
    assert cache.trim({b}) == {c}
    cache.close()


def test_never_evicts_a_blob_in_use(tmp_path: Path, store: LocalBlobStore) -> None:
    a, b = _blobs(store, 2)
    root = tmp_path / "cache"
    cache = BlobCache(store, root, 1, lambda _s: None)  # every blob is over budget
    _get(cache, a)
    _get(cache, b)
    assert cache.trim({a, b}) == set() and _on_disk(root) == {a, b}
    assert cache.used_bytes == 2 * SIZE  # over budget while both are in use
    assert cache.trim({b}) == {a} and _on_disk(root) == {b}
    assert cache.trim(set()) == {b} and cache.used_bytes == 0
    cache.close()


def test_a_blob_is_pinned_from_get_until_a_trim_without_it(
    tmp_path: Path, store: LocalBlobStore
) -> None:
    [a] = _blobs(store, 1)
    cache = BlobCache(store, tmp_path / "cache", 1, lambda _s: None)
    _get(cache, a)  # returned for a job about to start: not evicted before the next trim
    assert cache.trim({a}) == set()
    assert cache.trim(set()) == {a}
    cache.close()


def test_restart_indexes_files_already_there(tmp_path: Path, store: LocalBlobStore) -> None:
    a, b, c = _blobs(store, 3)
    root = tmp_path / "cache"
    first = BlobCache(store, root, 1 << 20, lambda _s: None)
    for digest in (a, b, c):
        _get(first, digest)
    first.close()
    now = time.time()
    for age, digest in ((300, b), (200, a), (100, c)):  # b is the least recently used
        os.utime(first.path(digest), (now - age, now - age))
    stale, fresh = root / f".{a}.old.part", root / f".{a}.new.part"
    for part, age in ((stale, 2 * blob_cache.STALE_PART_S), (fresh, 1)):
        part.write_bytes(b"partial")
        os.utime(part, (now - age, now - age))
    fetched: list[float] = []
    second = BlobCache(store, root, 2 * SIZE, fetched.append)
    assert second.used_bytes == 3 * SIZE and all(d in second for d in (a, b, c))
    assert not stale.exists() and fresh.exists()  # a crashed fetch's leftovers go
    assert second.trim(set()) == {b}
    assert second.get(a) == second.path(a) and fetched == []  # served from disk, not fetched
    second.close()


def test_neighbour_workers_never_evict_a_blob_the_other_uses(
    tmp_path: Path, store: LocalBlobStore
) -> None:
    a, b = _blobs(store, 2)
    root = tmp_path / "cache"
    mine = BlobCache(store, root, 1, lambda _s: None)
    theirs = BlobCache(store, root, 1, lambda _s: None)
    _get(mine, a)
    mine.trim({a})
    assert theirs.get(a) == theirs.path(a)  # found on disk: shared, not fetched twice
    theirs.trim(set())
    assert _on_disk(root) == {a}  # theirs could not evict it: mine holds it
    mine.trim(set())  # mine is done with it: nobody holds it now, so mine evicts it
    _get(theirs, b)
    theirs.trim({b})
    assert _on_disk(root) == {b} and a not in theirs and a not in mine
    mine.close()
    theirs.close()


class BlockingStore:
    """Fetches wait for `release`; the first one fails, as a flaky S3 would."""

    def __init__(self, root: Path) -> None:
        self.local = LocalBlobStore(root)
        self.release = threading.Event()
        self.calls = 0

    def fetch_to(self, digest: str, dest: Path) -> None:
        self.calls += 1
        assert self.release.wait(60)
        if self.calls == 1:
            raise OSError("connection reset by peer")
        self.local.fetch_to(digest, dest)


def test_failed_and_abandoned_fetches_do_not_pile_up(
    tmp_path: Path, store: LocalBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = _blobs(store, 2)
    flaky = BlockingStore(tmp_path / "store")
    cache = BlobCache(flaky, tmp_path / "cache", 1 << 20, lambda _s: None, fetchers=1)
    # One fetcher: a's fetch runs (blocked), b's waits in the queue.
    assert cache.get(a) is None and cache.get(b) is None
    assert cache.trim({a}) == set() and cache.fetching == 1  # nobody waits for b: dropped
    flaky.release.set()
    with pytest.raises(AdapterFetchError, match="connection reset"):
        wait_until(lambda: cache.get(a) is not None)
    with pytest.raises(AdapterFetchError):  # remembered for a while: no refetch per job
        cache.get(a)
    assert flaky.calls == 1
    monkeypatch.setattr(blob_cache, "FAILURE_MEMORY_S", 0.0)
    cache.trim(set())
    assert cache.fetching == 0
    assert _get(cache, a).is_file() and flaky.calls == 2  # retried once the memory expired
    cache.close()
