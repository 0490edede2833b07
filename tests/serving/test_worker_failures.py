"""A failure tied to one job ends that job alone; a failure of the process stops it clearly."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import pytest
import redis
from botocore.exceptions import ClientError

from adapter_store.blobs import LocalBlobStore
from broker import keys
from tests.serving.test_worker_fakes import (
    ScriptedEngine,
    blob,
    ended,
    enqueue,
    events,
    outcome,
    service,
    ticks,
    wait_until,
)
from worker.blob_cache import BlobCache


class FlakyStore:
    """A local blob store whose S3-like client answers 500 for one digest."""

    def __init__(self, root: Path, failing: str) -> None:
        self.local = LocalBlobStore(root)
        self.failing = failing

    def fetch_to(self, digest: str, dest: Path) -> None:
        if digest == self.failing:
            error = {"Error": {"Code": "InternalError", "Message": "We encountered an error"}}
            raise ClientError(error, "GetObject")  # type: ignore[arg-type]
        self.local.fetch_to(digest, dest)


def _cache(store: object, root: Path) -> BlobCache:
    return BlobCache(store, root, 1 << 30, lambda _s: None)  # type: ignore[arg-type]


def test_a_store_error_fails_only_its_job(redis_url: str, tmp_path: Path) -> None:
    local = LocalBlobStore(tmp_path / "store")
    good = local.put(blob())
    failing = "f" * 64
    cache = _cache(FlakyStore(tmp_path / "store", failing), tmp_path / "cache")
    enqueue(redis_url, "s3-500", failing)
    enqueue(redis_url, "next", good)
    enqueue(redis_url, "base")
    svc = service(redis_url, blobs=cache)
    wait_until(lambda: all(ended(redis_url, r) for r in ("s3-500", "next", "base")), svc.tick)
    assert outcome(redis_url, "s3-500") == ("", keys.Code.FAILED_PRECONDITION)
    assert "InternalError" in events(redis_url, "s3-500")[-1].failure.message
    assert outcome(redis_url, "next") == ("abc", 0) and outcome(redis_url, "base") == ("abc", 0)
    cache.close()


def test_a_malformed_blob_fails_only_its_job(redis_url: str, tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "store")
    bad = {
        "bad-json": store.put(blob('{"peft_type": "LORA", "r": ')),
        "not-object": store.put(blob('["LORA"]')),
        "no-config": store.put(blob(None)),
        "not-safetensors": store.put(b"\x80\x04 pickle, not safetensors"),
    }
    good = store.put(blob())
    cache = _cache(store, tmp_path / "cache")
    engine = ScriptedEngine()
    for rid, digest in bad.items():
        enqueue(redis_url, rid, digest)
    enqueue(redis_url, "good", good)
    svc = service(redis_url, engine=engine, blobs=cache)
    rids = [*bad, "good"]
    wait_until(lambda: all(ended(redis_url, r) for r in rids), svc.tick)
    for rid in bad:
        assert outcome(redis_url, rid) == ("", keys.Code.FAILED_PRECONDITION), rid
    assert outcome(redis_url, "good") == ("abc", 0)
    assert engine.added == ["good"] and set(engine.adapters) == {good}
    assert not any(cache.path(d).exists() for d in bad.values())  # nothing malformed kept
    cache.close()


def test_an_unexpected_error_fails_only_its_job(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    enqueue(redis_url, "boom-1", text="boom")
    enqueue(redis_url, "after")
    with caplog.at_level(logging.INFO, logger="worker"):
        ticks(service(redis_url), 5)
    assert outcome(redis_url, "boom-1") == ("", keys.Code.INTERNAL)
    assert "see the worker's log" in events(redis_url, "boom-1")[-1].failure.message
    assert outcome(redis_url, "after") == ("abc", 0)
    [record] = [r for r in caplog.records if "boom-1" in r.getMessage()]
    assert record.levelno == logging.WARNING and record.exc_info is not None
    assert "internal" in record.getMessage()


def test_an_undecodable_job_is_dead_lettered_alone(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    queue = keys.queue("garbled")
    client.xgroup_create(queue, keys.GROUP, id="0", mkstream=True)
    client.xadd(queue, {keys.PAYLOAD: b"\x0a\xff"})  # truncated protobuf
    client.zadd(keys.READY, {"garbled": 1})
    client.sadd(keys.STREAMS, "garbled")
    client.xadd(queue, {keys.PAYLOAD: b"\x0a\xff\xff"})  # a second one, claimed with it
    enqueue(redis_url, "fine")
    ticks(service(redis_url), 5)
    assert outcome(redis_url, "fine") == ("abc", 0)
    dead = client.xrange(keys.DEAD)
    assert [fields[b"reason"] for _, fields in dead] == [b"undecodable job"] * 2
    assert client.xlen(queue) == 0  # acked and deleted: never redelivered


def test_an_engine_failure_hands_back_and_stops_the_process(redis_url: str) -> None:
    enqueue(redis_url, "streaming", max_tokens=10_000)
    enqueue(redis_url, "parked", "never")
    engine = ScriptedEngine()
    svc = service(redis_url, engine=engine)
    failed: list[BaseException] = []
    stop = threading.Event()

    def run() -> None:
        try:
            svc.run(stop)
        except RuntimeError as exc:
            failed.append(exc)

    # daemon, and stopped whatever happens: a failing test must not keep pytest alive
    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    try:
        wait_until(lambda: bool(events(redis_url, "streaming")))
        engine.fail_step = True
        runner.join(60)
    finally:
        stop.set()
    assert not runner.is_alive() and "illegal memory access" in str(failed[0])
    text, code = outcome(redis_url, "streaming")
    assert code == keys.Code.UNAVAILABLE and text  # streamed: ends retryable
    assert not events(redis_url, "parked")  # never started: left for another worker
    client = redis.Redis.from_url(redis_url)
    assert client.xpending(keys.queue("never"), keys.GROUP)["pending"] == 1
    assert not client.exists(keys.heartbeat("w"))  # retired: taken over at once


def test_the_entry_point_exits_non_zero_with_a_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from worker.__main__ import main

    monkeypatch.setenv("LORAPOOL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LORAPOOL_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(signal, "signal", lambda *_: None)
    with caplog.at_level(logging.CRITICAL, logger="worker"):
        assert main(["--adapter-cache-mb", "0", "--name", "w-test"]) == 1
    [record] = caplog.records
    assert "worker w-test failed" in record.getMessage() and record.exc_info is not None
