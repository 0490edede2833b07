"""End to end: gateway and two workers as subprocesses, SmolLM2, real Redis and registry."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psycopg
import pytest
import redis

from broker import keys
from broker.queue import Producer
from protos.lorapool.v1 import generation_pb2, generation_pb2_grpc, queue_pb2
from tests.serving.redis_proc import RedisProcess
from tests.serving.stack import Stack, base_env

pytestmark = pytest.mark.slow
SAMPLES = Path(__file__).resolve().parents[2] / "samples" / "adapters"
PROMPT = "Name three colors."


PG = "host=127.0.0.1 user=postgres dbname=postgres connect_timeout=3"


@pytest.fixture(scope="module")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh PostgreSQL database on the local server (dropped after); SQLite when none answers."""
    name = f"lorapool_e2e_{uuid.uuid4().hex[:8]}"
    try:
        with psycopg.connect(PG, autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error:
        yield f"sqlite:///{tmp_path_factory.mktemp('db') / 'registry.sqlite3'}"
        return
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect(PG, autocommit=True) as c:
        c.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> dict[str, Path]:
    """name → PEFT directory: the samples when present, else two random LoRAs."""
    found = {
        n: SAMPLES / n for n in ("upper", "json") if (SAMPLES / n / "adapter_config.json").is_file()
    }
    if found:
        return found
    from tests.worker.adapters import make_adapter

    root = tmp_path_factory.mktemp("adapters")
    return {
        f"rand{i}": make_adapter(model_dir, root / f"rand{i}", r=8, alpha=16, seed=i, std=0.08)
        for i in range(2)
    }


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from worker.config import default_cache_dir
    from worker.model.source import DEFAULT_MODEL, resolve_model_dir

    return resolve_model_dir(DEFAULT_MODEL, default_cache_dir())


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    redis_proc: RedisProcess,
    model_dir: Path,
    adapters: dict[str, Path],
    database_url: str,
) -> Iterator[Stack]:
    from adapter_store.basemodel import BaseModelSpec
    from adapter_store.blobs import open_blob_store
    from adapter_store.db import make_engine, make_session_factory, upgrade
    from adapter_store.settings import StoreSettings
    from adapter_store.upload import upload_adapter

    if redis_proc.proc is None:
        redis_proc.start()
    redis.Redis.from_url(redis_proc.url).flushall()
    data = tmp_path_factory.mktemp("data")
    url = database_url
    env = base_env(data, redis_proc.url, url, model_dir)
    store = StoreSettings.from_env(env)
    upgrade(url)
    sessions = make_session_factory(make_engine(url))
    base = BaseModelSpec.from_hf_dir(model_dir)
    for name, directory in adapters.items():
        upload_adapter(sessions, open_blob_store(store), directory, name, base=base, max_rank=64)
    s = Stack(env, tmp_path_factory.mktemp("logs"))
    s.start_gateway()
    s.start_worker("w1")
    s.start_worker("w2")
    s.wait_workers()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def reference(model_dir: Path, adapters: dict[str, Path]) -> dict[str, str]:
    """What the engine alone says for PROMPT, per adapter (greedy, 24 tokens)."""
    from worker.config import EngineConfig
    from worker.engine import Engine
    from worker.sequence import SamplingParams

    engine = Engine.from_config(EngineConfig(num_pages=256, max_num_seqs=4))
    out = {}
    chat = [{"role": "user", "content": PROMPT}]
    for name in ["", *adapters]:
        if name:
            engine.register_adapter(name, adapters[name])
        [event] = engine.generate([chat], SamplingParams(max_tokens=24), [name or None])
        out[name] = event.text
    return out


def stub(stack: Stack) -> generation_pb2_grpc.GenerationStub:
    return generation_pb2_grpc.GenerationStub(grpc.insecure_channel(stack.target))


def chat_request(
    adapter: str = "", max_tokens: int = 24, long: bool = False, **kw: object
) -> generation_pb2.GenerateRequest:
    """`long`: ignore end-of-sequence, so the request really runs `max_tokens` steps."""
    sampling = dict(max_tokens=max_tokens, ignore_eos=long)
    request = generation_pb2.GenerateRequest(adapter=adapter, sampling=sampling, **kw)  # type: ignore[arg-type]
    request.chat.messages.add(role="user", content=PROMPT)
    return request


def collect(
    stack: Stack, request: generation_pb2.GenerateRequest, timeout: float = 120
) -> tuple[str, str]:
    """(text, outcome): outcome is the finish reason name or the status code name."""
    text = ""
    try:
        for r in stub(stack).Generate(request, timeout=timeout):
            if r.HasField("delta"):
                text += r.delta.text
            else:
                return text, generation_pb2.FinishReason.Name(r.final.finish_reason)
    except grpc.RpcError as exc:
        return text, exc.code().name  # type: ignore[attr-defined]
    return text, "NO_FINAL"


def test_adapters_at_once_match_the_engine_alone(stack: Stack, reference: dict[str, str]) -> None:
    names = list(reference) * 2
    with ThreadPoolExecutor(len(names)) as pool:
        results = list(pool.map(lambda n: collect(stack, chat_request(n)), names))
    for name, (text, outcome) in zip(names, results, strict=True):
        assert outcome in ("FINISH_REASON_LENGTH", "FINISH_REASON_STOP")
        assert text == reference[name], name
    assert len(set(reference.values())) == len(reference)  # each adapter changes the output
    if "upper" in reference:
        letters = [c for c in reference["upper"] if c.isalpha()]
        assert sum(c.isupper() for c in letters) > 0.8 * len(letters)


def test_cancel_stops_decoding_and_frees_pages(stack: Stack) -> None:
    free_before = {w: stack.metric(w, "lorapool_worker_free_pages") for w in stack.workers}
    call = stub(stack).Generate(
        chat_request(max_tokens=400, long=True, request_id="cancel-me"), timeout=120
    )
    for _ in range(3):
        next(call)
    call.cancel()
    client = redis.Redis.from_url(stack.env["LORAPOOL_REDIS_URL"])
    events = terminal_events(client, "cancel-me")
    assert events[-1].failure.code == keys.Code.CANCELLED
    # The worker stopped decoding: far fewer than the 400 tokens asked for were published.
    assert sum(e.WhichOneof("kind") == "delta" for e in events) < 400
    deadline = time.monotonic() + 60  # the pages come back once the worker saw the flag
    while (free := {w: stack.metric(w, "lorapool_worker_free_pages") for w in stack.workers}) != (
        free_before
    ):
        assert time.monotonic() < deadline, f"free pages {free}, before {free_before}"
        time.sleep(0.2)


def terminal_events(
    client: redis.Redis, request_id: str, timeout_s: float = 120
) -> list[queue_pb2.Event]:
    deadline = time.monotonic() + timeout_s
    while True:
        events = [keys.decode_event(f[b"ev"]) for _, f in client.xrange(keys.results(request_id))]
        if (events and events[-1].WhichOneof("kind") != "delta") or time.monotonic() > deadline:
            return events
        time.sleep(0.05)


def test_deadlines(stack: Stack) -> None:
    text, outcome = collect(
        stack, chat_request(max_tokens=400, long=True, request_id="late"), timeout=1.5
    )
    assert outcome == "DEADLINE_EXCEEDED"
    client = redis.Redis.from_url(stack.env["LORAPOOL_REDIS_URL"])
    events = terminal_events(client, "late")
    assert events[-1].failure.code in (keys.Code.DEADLINE_EXCEEDED, keys.Code.CANCELLED)
    # A job whose deadline passed in the queue never runs: no token is published for it.
    now = int(time.time() * 1000)
    job = queue_pb2.Job(
        request_id="expired", request=chat_request(), enqueued_ms=now - 5000, deadline_ms=now - 1000
    )

    async def enqueue() -> None:
        aclient = keys.async_client(stack.env["LORAPOOL_REDIS_URL"], 2)
        await Producer(aclient, keys.Limits()).enqueue(job, now)
        await aclient.aclose()

    asyncio.run(enqueue())
    events = terminal_events(client, "expired")
    assert [e.WhichOneof("kind") for e in events] == ["failure"]
    assert events[0].failure.code == keys.Code.DEADLINE_EXCEEDED


def test_bad_requests_leave_other_traffic_alone(stack: Stack, reference: dict[str, str]) -> None:
    bad = [
        generation_pb2.GenerateRequest(text=""),
        generation_pb2.GenerateRequest(text="x", adapter="../../etc/passwd"),
        generation_pb2.GenerateRequest(text="x", adapter="no-such-adapter"),
        generation_pb2.GenerateRequest(text="x", sampling=dict(top_p=2.0)),  # type: ignore[arg-type]
    ]
    with ThreadPoolExecutor(5) as pool:
        good = pool.submit(collect, stack, chat_request())
        codes = [c for _, c in pool.map(lambda r: collect(stack, r, 60), bad)]
    assert codes == ["INVALID_ARGUMENT", "INVALID_ARGUMENT", "NOT_FOUND", "INVALID_ARGUMENT"]
    assert good.result()[0] == reference[""]


def test_overload_gets_resource_exhausted_and_accepted_complete(stack: Stack) -> None:
    # Long requests: the accepted ones (at most 10, the total bound) stay in flight while
    # all 30 arrive, however slowly a busy machine starts the client threads.
    request = chat_request(max_tokens=48, long=True)
    with ThreadPoolExecutor(30) as pool:
        results = list(pool.map(lambda _: collect(stack, request, 300), range(30)))
    outcomes = [o for _, o in results]
    assert outcomes.count("RESOURCE_EXHAUSTED") >= 10
    assert set(outcomes) <= {"RESOURCE_EXHAUSTED", "FINISH_REASON_LENGTH", "FINISH_REASON_STOP"}


def test_redis_restart_under_traffic(stack: Stack, redis_proc: RedisProcess) -> None:
    redis_proc.stop()
    _, outcome = collect(stack, chat_request(), timeout=60)
    assert outcome == "UNAVAILABLE"  # not a request left hanging until its deadline
    redis_proc.start()
    deadline = time.monotonic() + 120
    while True:
        text, outcome = collect(stack, chat_request(max_tokens=4), timeout=20)
        if outcome.startswith("FINISH_REASON") or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert outcome.startswith("FINISH_REASON") and text


def wait_until_serving(stack: Stack, seconds: float = 120) -> None:
    """Block until a request completes (e.g. after the Redis restart test)."""
    deadline = time.monotonic() + seconds
    outcome = ""
    while time.monotonic() < deadline:
        _, outcome = collect(stack, chat_request(max_tokens=2), timeout=20)
        if outcome.startswith("FINISH_REASON"):
            return
        time.sleep(0.5)
    raise AssertionError(f"the stack does not serve: last outcome {outcome}")


def test_kill_9_a_worker_mid_stream(stack: Stack) -> None:
    wait_until_serving(stack)
    requests = [chat_request(max_tokens=64, long=True, request_id=f"k{i}") for i in range(4)]
    before = {w: stack.metric(w, "lorapool_worker_output_tokens_total") for w in stack.workers}
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(collect, stack, r, 120) for r in requests]
        deadline = time.monotonic() + 120
        while True:  # kill a worker that is streaming
            busy = [
                w
                for w in before
                if stack.metric(w, "lorapool_worker_output_tokens_total") >= before[w] + 2
            ]
            if busy:
                break
            if time.monotonic() > deadline or all(f.done() for f in futures):
                done = [f.result()[1] for f in futures if f.done()]
                raise AssertionError(f"no worker got work; finished outcomes: {done}")
            time.sleep(0.05)
        stack.kill_worker(busy[0])
        outcomes = [f.result(timeout=300)[1] for f in futures]
    assert set(outcomes) <= {"FINISH_REASON_LENGTH", "FINISH_REASON_STOP", "UNAVAILABLE"}
    client = redis.Redis.from_url(stack.env["LORAPOOL_REDIS_URL"])
    deadline = time.monotonic() + 120
    while int(client.get(keys.TOTAL) or 0) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert int(client.get(keys.TOTAL) or 0) == 0


def test_sigterm_drains_the_last_worker(stack: Stack) -> None:
    """Runs after the kill test: one worker is left; SIGTERM lets its streams finish."""
    [name] = list(stack.workers)
    with ThreadPoolExecutor(3) as pool:
        futures = [
            pool.submit(collect, stack, chat_request(max_tokens=24, long=True), 120)
            for _ in range(3)
        ]
        deadline = time.monotonic() + 120
        while stack.metric(name, "lorapool_worker_active_jobs") < 3:  # all three claimed
            assert time.monotonic() < deadline, "the worker never got the work"
            time.sleep(0.02)
        assert stack.terminate_worker(name, timeout_s=120) == 0
        outcomes = [f.result(timeout=300)[1] for f in futures]
    assert all(o.startswith("FINISH_REASON") for o in outcomes), outcomes
