"""The unified pool under pressure, and loads that never stall the step loop.

A tiny random Llama (2 layers, hidden 64) keeps these fast; the mechanisms are the ones
SmolLM2 runs: adapter pages and KV blocks from one pool, eviction before preemption,
background host loads.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from adapter_store.basemodel import BaseModelSpec
from tests.adapter_store.builders import write_lora
from worker.config import EngineConfig
from worker.engine import Engine
from worker.lora.adapter import HostAdapter, load_host_adapter
from worker.lora.manager import Tier
from worker.sequence import FinishReason, SamplingParams, TokenEvent

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANKS = (4, 8, 16, 32, 64)


def write_adapters(root: Path, base: Path, count: int, seed: int = 0) -> dict[str, Path]:
    """`count` LoRAs on all seven projections, ranks drawn from RANKS."""
    spec = BaseModelSpec.from_hf_dir(base)
    rng = random.Random(seed)
    out = {}
    for i in range(count):
        r = rng.choice(RANKS)
        out[f"a{i}"] = write_lora(root / f"a{i}", spec, seed=i, r=r, targets=ALL, lora_alpha=2 * r)
    return out


def run_all(
    engine: Engine, jobs: list[tuple[list[int], str | None]], tokens: int
) -> list[TokenEvent]:
    sampling = SamplingParams(max_tokens=tokens, ignore_eos=True)
    return engine.generate([p for p, _ in jobs], sampling, [a for _, a in jobs])


@pytest.mark.slow
def test_200_adapters_through_a_pool_for_20_give_the_unlimited_pool_tokens(
    tmp_path: Path, tiny_model: Callable[..., Path]
) -> None:
    base = tiny_model("llama")
    adapters = write_adapters(tmp_path / "adapters", base, 200)
    rng = random.Random(7)
    names = list(adapters)
    # Skewed popularity (power law, S-LoRA's alpha = 0.3 over ranks): a few hot adapters,
    # a long tail touched once.
    weights = [1 / (i + 1) ** 1.3 for i in range(len(names))]
    jobs = [
        (
            [rng.randrange(3, 40000) for _ in range(rng.randint(4, 24))],
            rng.choices(names, weights)[0],
        )
        for _ in range(160)
    ]
    jobs += [([5, 6, 7, 8], None)] * 8
    jobs += [([9, 10, 11], n) for n in names[::5]]  # every 5th adapter at least once
    reference = Engine.from_config(EngineConfig(model=str(base), memory_mb=512, max_num_seqs=16))
    # A rank-16 adapter takes 16 pages of this model (2 layers · 2 · 16 tokens · 32): ~20 of
    # the mix fit in 400 pages beside the KV of 16 running sequences (16 · 2 pages).
    small = Engine.from_config(EngineConfig(model=str(base), num_pages=400, max_num_seqs=16))
    for engine in (reference, small):
        for name, path in adapters.items():
            engine.register_adapter(name, path)
    want = run_all(reference, jobs, 6)
    got = run_all(small, jobs, 6)
    assert [e.error for e in got if e.error] == []
    assert [e.token_ids for e in got] == [e.token_ids for e in want]
    stats = small.stats()
    assert stats.device_evictions >= 50, stats  # the churn: far more adapters than fit
    assert stats.device_misses > stats.adapters_loaded
    assert stats.adapter_padding < 0.05
    assert reference.stats().device_evictions == 0


def test_a_cold_load_never_stalls_the_other_sequences(
    tmp_path: Path, tiny_model: Callable[..., Path]
) -> None:
    base = tiny_model("llama")
    paths = write_adapters(tmp_path / "adapters", base, 2, seed=3)
    release, started = threading.Event(), threading.Event()
    spec = BaseModelSpec.from_hf_dir(base)

    def loader(adapter_id: str, source: Path) -> HostAdapter:
        if adapter_id == "a1":  # the cold one: held until the test lets it go
            started.set()
            assert release.wait(120), "the test never released the load"
        return load_host_adapter(adapter_id, source, spec, 128, torch.float32, False)

    engine = Engine.from_config(EngineConfig(model=str(base)), adapter_loader=loader)
    for name, path in paths.items():
        engine.register_adapter(name, path)
    long, short = (SamplingParams(max_tokens=n, ignore_eos=True) for n in (40, 8))
    engine.add_request("base", [5, 6, 7], long)
    engine.add_request("warm", [5, 6, 7], long, "a0")
    engine.add_request("cold", [8, 9, 10], short, "a1")
    assert started.wait(60), "the cold load never started"
    tokens: dict[str, list[int]] = {"base": [], "warm": [], "cold": []}
    finals: dict[str, TokenEvent] = {}

    def step() -> None:
        for event in engine.step():
            tokens[event.request_id] += event.token_ids
            if event.finished:
                finals[event.request_id] = event

    step()  # the first step prefills base and warm
    for _ in range(12):  # the cold load is blocked: every step still decodes the others
        before = {k: len(v) for k, v in tokens.items()}
        step()
        assert engine.adapter_tier("a1") is Tier.LOADING
        assert len(tokens["base"]) == before["base"] + 1
        assert len(tokens["warm"]) == before["warm"] + 1
        assert tokens["cold"] == []
    release.set()
    while engine.has_unfinished():
        step()
    assert finals["cold"].finish_reason is FinishReason.LENGTH
    alone = Engine.from_config(EngineConfig(model=str(base)))
    alone.register_adapter("a1", paths["a1"])
    (ref,) = alone.generate([[8, 9, 10]], short, ["a1"])
    assert tokens["cold"] == ref.token_ids
