"""Continuous batching: staggered arrivals, chunked prefill, preemption, cancellation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from worker.config import EngineConfig
from worker.engine import Engine
from worker.sequence import FinishReason, SamplingParams, TokenEvent

GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 49152, (int(5 + 7 * i),), generator=gen).tolist() for i in range(n)]


def alone(path: Path, prompt: list[int], sampling: SamplingParams = GREEDY) -> list[int]:
    engine = Engine.from_config(EngineConfig(model=str(path)))
    return engine.generate([prompt], sampling)[0].token_ids


def run_staggered(
    engine: Engine, jobs: list[list[int]], sampling: SamplingParams
) -> dict[str, list[int]]:
    """Add one request every other step; collect each request's tokens."""
    tokens: dict[str, list[int]] = {}
    finished: set[str] = set()
    step = 0
    while len(finished) < len(jobs):
        if step % 2 == 0 and step // 2 < len(jobs):
            i = step // 2
            engine.add_request(f"r{i}", jobs[i], sampling)
            tokens[f"r{i}"] = []
        for event in engine.step():
            tokens[event.request_id] += event.token_ids
            if event.finished:
                finished.add(event.request_id)
        step += 1
    return tokens


def test_staggered_arrivals_give_the_same_tokens_as_alone(tiny_model: Callable[..., Path]) -> None:
    path = tiny_model("llama")
    jobs = prompts(6)
    engine = Engine.from_config(EngineConfig(model=str(path), max_batch_tokens=16, page_size=4))
    got = run_staggered(engine, jobs, GREEDY)
    for i, job in enumerate(jobs):
        assert got[f"r{i}"] == alone(path, job)


def test_preemption_recomputes_and_gives_the_same_tokens(tiny_model: Callable[..., Path]) -> None:
    path = tiny_model("mistral")
    jobs = prompts(6, seed=3)
    # 24 pages of 4 tokens cannot hold six sequences of up to 65 tokens at once.
    engine = Engine.from_config(
        EngineConfig(model=str(path), num_pages=24, page_size=4, max_batch_tokens=32)
    )
    got = run_staggered(engine, jobs, GREEDY)
    assert engine.stats().preemptions > 0
    assert engine.num_free_pages() == 24
    for i, job in enumerate(jobs):
        assert got[f"r{i}"] == alone(path, job)


def test_seeded_sampling_does_not_depend_on_the_batch(tiny_model: Callable[..., Path]) -> None:
    path = tiny_model("qwen2")
    sampling = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=7, max_tokens=16)
    jobs = prompts(4, seed=5)
    engine = Engine.from_config(EngineConfig(model=str(path), num_pages=20, page_size=4))
    got = run_staggered(engine, jobs, sampling)
    for i, job in enumerate(jobs):
        assert got[f"r{i}"] == alone(path, job, sampling)
    other_seed = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=8, max_tokens=16)
    assert alone(path, jobs[0], other_seed) != got["r0"]


def test_cancel_frees_pages_at_once_and_ends_with_cancelled(
    tiny_model: Callable[..., Path],
) -> None:
    engine = Engine.from_config(EngineConfig(model=str(tiny_model("llama")), num_pages=64))
    engine.add_request("a", prompts(1)[0], SamplingParams(max_tokens=100, ignore_eos=True))
    engine.add_request("b", prompts(2)[1], SamplingParams(max_tokens=5, ignore_eos=True))
    engine.step()
    engine.step()
    used_before = 64 - engine.num_free_pages()
    engine.cancel("a")
    assert 64 - engine.num_free_pages() < used_before
    events: list[TokenEvent] = []
    while engine.has_unfinished():
        events += engine.step()
    final = {e.request_id: e for e in events if e.finished}
    assert final["a"].finish_reason is FinishReason.CANCELLED
    assert final["b"].finish_reason is FinishReason.LENGTH
    assert final["b"].completion_tokens == 5
    assert engine.num_free_pages() == 64


def test_every_request_gets_exactly_one_final_event(tiny_model: Callable[..., Path]) -> None:
    engine = Engine.from_config(EngineConfig(model=str(tiny_model("llama")), max_num_seqs=3))
    for i, job in enumerate(prompts(7)):
        engine.add_request(f"r{i}", job, SamplingParams(max_tokens=3 + i, ignore_eos=True))
    finals: list[str] = []
    while engine.has_unfinished():
        finals += [e.request_id for e in engine.step() if e.finished]
    assert sorted(finals) == sorted(f"r{i}" for i in range(7))
