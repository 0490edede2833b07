"""`lorapool serve` keeps its stack alive: kill -9 a streaming worker, the private Redis, the
gateway, and the stack serves again with nothing else restarted; SIGTERM stops it all (exit 0).

The tests run in file order on one `lorapool serve` (a fresh data dir, its own Redis).
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis

from protos.lorapool.v1 import generation_pb2, generation_pb2_grpc
from tests.serving.stack import Serve, alive, serve_env

pytestmark = pytest.mark.slow
RESTART_DEADLINE_S = 120  # "within a minute", with room for a busy 2-core machine


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    tmp = tmp_path_factory.mktemp("serve")
    s = Serve(serve_env(LORAPOOL_DATA_DIR=str(tmp / "data")), tmp / "serve.log")
    try:
        s.wait_serving()
        yield s
    finally:
        if s.proc.poll() is None:
            s.stop()


def request(max_tokens: int, long: bool = False) -> generation_pb2.GenerateRequest:
    sampling = generation_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=long)
    r = generation_pb2.GenerateRequest(sampling=sampling)
    r.chat.messages.add(role="user", content="Name three colors.")
    return r


def generates(serve: Serve, deadline_s: float = RESTART_DEADLINE_S) -> str:
    """Retry a short generation until it finishes (UNAVAILABLE while a child restarts)."""
    stub = generation_pb2_grpc.GenerationStub(grpc.insecure_channel(serve.target))
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            events = list(stub.Generate(request(8), timeout=deadline_s))
            return "".join(e.delta.text for e in events if e.HasField("delta"))
        except grpc.RpcError as exc:
            retryable = exc.code() in (grpc.StatusCode.UNAVAILABLE,)  # type: ignore[attr-defined]
            assert retryable and time.monotonic() < deadline, f"{exc}\n{serve.text()}"
            time.sleep(1)


class Stream(threading.Thread):
    """A long generation read on a thread: `started` once two tokens arrived."""

    def __init__(self, serve: Serve) -> None:
        super().__init__(daemon=True)
        self.stub = generation_pb2_grpc.GenerationStub(grpc.insecure_channel(serve.target))
        self.started = threading.Event()
        self.tokens = 0
        self.error: grpc.RpcError | None = None

    def run(self) -> None:
        try:
            for event in self.stub.Generate(request(400, long=True), timeout=300):
                self.tokens += event.HasField("delta")
                if self.tokens >= 2:
                    self.started.set()
        except grpc.RpcError as exc:
            self.error = exc
        finally:
            self.started.set()


def test_kill_9_of_a_streaming_worker(serve: Serve) -> None:
    gateway, redis_pid, worker = serve.pid("gateway"), serve.pid("redis"), serve.pid("worker-1")
    stream = Stream(serve)
    stream.start()
    assert stream.started.wait(RESTART_DEADLINE_S) and stream.error is None, serve.text()
    os.kill(worker, signal.SIGKILL)
    stream.join(300)
    assert not stream.is_alive() and stream.error is not None, "the stream did not end"
    assert stream.error.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    details = stream.error.details()  # type: ignore[attr-defined]
    # The documented statuses (docs/serving.md, "When a worker dies"): the restarted worker
    # reclaimed the job first, or the gateway's no-live-worker grace ran out first (a slow
    # start on a busy machine). Both are UNAVAILABLE and safe to retry.
    lost = r"worker lost after \d+ tokens; retry|no live worker: retry later"
    assert re.fullmatch(lost, details), details
    serve.wait_log(rf"worker-1 \(pid {worker}\) killed by SIGKILL after \d+ s up; restarting")
    assert generates(serve)
    assert serve.pid("worker-1") != worker and alive(serve.pid("worker-1"))
    assert (serve.pid("gateway"), serve.pid("redis")) == (gateway, redis_pid)
    assert alive(gateway) and alive(redis_pid)
    assert not re.search(r"(gateway|redis) \(pid \d+\) (killed|exited)", serve.text())


def test_kill_9_of_the_private_redis(serve: Serve) -> None:
    url = re.search(r"\(Redis (redis://\S+),", serve.text())
    assert url, serve.text()
    client = redis.Redis.from_url(url.group(1), socket_timeout=10)
    client.set("lp:test:survives", "yes")
    rewrites = int(client.info("persistence")["aof_rewrites"])
    client.bgrewriteaof()  # on disk before the kill (the append-only file is fsynced per second)
    deadline = time.monotonic() + 60
    while (info := client.info("persistence"))["aof_rewrites"] <= rewrites or info[
        "aof_rewrite_in_progress"
    ]:
        assert time.monotonic() < deadline, info
        time.sleep(0.2)
    old, gateway, worker = serve.pid("redis"), serve.pid("gateway"), serve.pid("worker-1")
    os.kill(old, signal.SIGKILL)
    died = serve.wait_log(rf"redis \(pid {old}\) killed by SIGKILL")
    serve.wait_log(r"started redis \(pid \d+\)", after=died.end())
    assert generates(serve)
    assert client.get("lp:test:survives") == b"yes"  # same port, same data directory
    assert (serve.pid("gateway"), serve.pid("worker-1")) == (gateway, worker)


def test_kill_9_of_the_gateway(serve: Serve) -> None:
    old, redis_pid, worker = serve.pid("gateway"), serve.pid("redis"), serve.pid("worker-1")
    os.kill(old, signal.SIGKILL)
    died = serve.wait_log(rf"gateway \(pid {old}\) killed by SIGKILL")
    serve.wait_log(r"started gateway \(pid \d+\)", after=died.end())
    assert generates(serve)  # same address
    assert (serve.pid("redis"), serve.pid("worker-1")) == (redis_pid, worker)


def test_sigterm_stops_every_child_and_exits_0(serve: Serve) -> None:
    children = [serve.pid(name) for name in ("redis", "gateway", "worker-1")]
    assert serve.stop() == 0, serve.text()
    assert [pid for pid in children if alive(pid)] == []
    stops = re.findall(r"stopping (worker-1|gateway|redis) \(pid", serve.text())
    assert stops == ["worker-1", "gateway", "redis"]


def test_a_child_that_dies_during_start_up_fails_the_start(tmp_path: Path) -> None:
    """Before the banner nothing is restarted: a broken set-up fails fast, naming the child."""
    env = serve_env(LORAPOOL_DATA_DIR=str(tmp_path / "data"), LORAPOOL_MODEL="/no/such/model")
    s = Serve(env, tmp_path / "serve.log")
    assert s.proc.wait(600) == 1
    assert re.search(r"worker-1 \(pid \d+\) exited with status \d+ during start-up", s.text())
    assert "lorapool is serving" not in s.text()
