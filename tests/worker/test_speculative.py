"""Speculative decoding in the engine, on tiny random models: exact output, stops, cancel,
preemption, pages, control and options.

Prompt lookup needs text that repeats. A Mistral with a sliding window of 4 (2 layers)
sees only its last 7 tokens, so after the prompt P + G + P[-8:] (G: its own greedy
continuation of P) it generates G again, and n-gram lookup proposes G from the prompt:
long drafts, mostly accepted. A draft model equal to the target accepts everything.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from adapter_store.basemodel import BaseModelSpec
from broker.keys import Code, decode_speculative
from protos.lorapool.v1 import generation_pb2
from tests.adapter_store.builders import write_lora
from worker.config import EngineConfig
from worker.engine import Engine
from worker.jobs import failure_of
from worker.sequence import (
    FinishReason,
    NotServedHere,
    SamplingParams,
    ScheduledSeq,
    SpecMethod,
    SpeculativeParams,
    TokenEvent,
)
from worker.speculative.control import StepCost

Plan = Callable[[list[ScheduledSeq], int], list[ScheduledSeq]]
GREEDY = SamplingParams(max_tokens=32, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=11, max_tokens=32)


@pytest.fixture
def windowed(tiny_model: Callable[..., Path]) -> Path:
    return tiny_model("mistral", sliding_window=4)


def engine(path: Path, **config: object) -> Engine:
    return Engine.from_config(EngineConfig(model=str(path), page_size=4, **config))  # type: ignore[arg-type]


def repeating_prompts(
    path: Path, n: int, seed: int = 0, adapters: list[str | None] | None = None, root: Path = Path()
) -> list[list[int]]:
    """P + G + P[-8:] for n random P (G: the continuation with that prompt's adapter): the
    model's continuation of it is G again."""
    gen = torch.Generator().manual_seed(seed)
    base = [torch.randint(3, 49152, (10 + 3 * i,), generator=gen).tolist() for i in range(n)]
    e = engine(path) if adapters is None else with_adapters(engine(path), root, path)
    first = e.generate(base, SamplingParams(max_tokens=24, ignore_eos=True), adapters)
    return [p + f.token_ids + p[-8:] for p, f in zip(base, first, strict=True)]


def run_staggered(
    e: Engine,
    jobs: list[tuple[list[int], str | None]],
    sampling: SamplingParams,
    spec: SpeculativeParams | None = None,
) -> dict[str, list[TokenEvent]]:
    """Add one request every other step; every request's events."""
    events: dict[str, list[TokenEvent]] = {}
    step = 0
    while step < 2 * len(jobs) or e.has_unfinished():
        if step % 2 == 0 and step // 2 < len(jobs):
            i = step // 2
            e.add_request(f"r{i}", jobs[i][0], sampling, jobs[i][1], spec)
            events[f"r{i}"] = []
        for event in e.step():
            events[event.request_id].append(event)
        step += 1
    return events


def tokens_of(events: dict[str, list[TokenEvent]]) -> dict[str, list[int]]:
    return {rid: [t for e in evs for t in e.token_ids] for rid, evs in events.items()}


def with_adapters(e: Engine, root: Path, base: Path) -> Engine:
    spec = BaseModelSpec.from_hf_dir(base)
    for i, r in enumerate((4, 8)):
        targets = ("q_proj", "v_proj", "down_proj") if i else ("q_proj", "k_proj", "o_proj")
        e.register_adapter(f"a{i}", write_lora(root / f"a{i}", spec, seed=i, r=r, targets=targets))
    return e


class FixedCost(StepCost):
    """A step cost that ignores timings: T(N) = a + b·N."""

    def __init__(self, a: float, b: float) -> None:
        super().__init__()
        self.a, self.b = a, b

    def observe(self, rows: int, seconds: float) -> None:
        pass

    def seconds(self, rows: int) -> float:
        return self.a + self.b * rows


MEMORY_BOUND = FixedCost(1.0, 1 / 64)  # a row costs 1/64 of a step


def noisy_copy(path: Path, out: Path, scale: float, seed: int = 0) -> Path:
    """Another model with the target's vocabulary: its weights plus noise (a draft that
    agrees with the target often, not always)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(path, out)
    gen = torch.Generator().manual_seed(seed)
    for file in out.glob("*.safetensors"):
        tensors = load_file(str(file))
        noisy = {k: t + scale * torch.randn(t.shape, generator=gen) for k, t in tensors.items()}
        save_file(noisy, str(file), metadata={"format": "pt"})
    return out


SPECULATING = {
    "ngram": dict(speculative="ngram"),
    "ngram-fixed-gamma": dict(speculative="ngram", speculative_adaptive=False),
    "draft": dict(speculative="draft", speculative_adaptive=False),
    "self-draft": dict(speculative="draft", draft_layers=1, speculative_adaptive=False),
}


@pytest.mark.parametrize("case", SPECULATING)
def test_greedy_output_is_token_identical_in_a_mixed_adapter_batch(
    case: str, windowed: Path, tmp_path: Path
) -> None:
    config: dict[str, object] = dict(SPECULATING[case])
    if case == "draft":  # another model (no adapters): agrees with the base rows often
        config["draft_model"] = str(noisy_copy(windowed, tmp_path / "draft", 0.005))
    elif case == "self-draft":  # the target's first layer and head, with each adapter
        config["draft_model"] = str(windowed)
    adapters = [None, "a0", "a1"] * 2
    prompts = repeating_prompts(windowed, 6, adapters=adapters, root=tmp_path)
    jobs = list(zip(prompts, adapters, strict=True))
    want = run_staggered(with_adapters(engine(windowed), tmp_path, windowed), jobs, GREEDY)
    e = with_adapters(engine(windowed, **config), tmp_path, windowed)
    e.speculator.cost = MEMORY_BOUND  # the adaptive case plans on costs, not on timings
    got = run_staggered(e, jobs, GREEDY)
    assert tokens_of(got) == tokens_of(want)
    stats = e.stats()
    assert stats.spec_proposed > 0 and stats.spec_accepted > 0
    assert {adapter for adapter, _ in stats.spec_by_adapter} == {"", "a0", "a1"}
    if case.startswith("ngram"):  # lookup copies long spans here
        assert stats.spec_tokens_per_step > 1.5
    else:  # some drafts rejected: rollback exercised
        assert stats.spec_accepted < stats.spec_proposed
    assert e.stats().kv_pages == 0  # every KV page back (target and draft); adapters stay


def test_seeded_sampling_with_ngram_repeats_plain_seeded_output(windowed: Path) -> None:
    prompts = repeating_prompts(windowed, 4, seed=1)
    jobs = [(p, None) for p in prompts]
    want = tokens_of(run_staggered(engine(windowed), jobs, SEEDED))
    e = engine(windowed, speculative="ngram", speculative_adaptive=False)
    assert tokens_of(run_staggered(e, jobs, SEEDED)) == want
    assert e.stats().spec_accepted > 0


def test_sampled_drafts_are_verified_in_one_step_with_all_accepted(windowed: Path) -> None:
    """A draft model equal to the target: q = p, every sampled draft accepted."""
    e = engine(
        windowed,
        speculative="draft",
        draft_model=str(windowed),
        num_speculative_tokens=6,
        speculative_adaptive=False,
    )
    events = run_staggered(e, [(p, None) for p in repeating_prompts(windowed, 3)], SEEDED)
    stats = e.stats()
    assert stats.spec_accepted == stats.spec_proposed > 0
    assert max(len(ev.token_ids) for evs in events.values() for ev in evs) == 7
    assert e.num_free_pages() == e.pool.num_pages


def finals(path: Path, prompt: list[int], sampling: SamplingParams, **config: object) -> tuple:
    eos = config.pop("eos", None)
    e = engine(path, **config)
    if eos is not None:
        e.eos_ids = frozenset({eos})  # type: ignore[misc]
    e.add_request("r", prompt, sampling)
    events: list[TokenEvent] = []
    while e.has_unfinished():
        events += e.step()
    tokens = [t for ev in events for t in ev.token_ids]
    text = "".join(ev.text for ev in events)
    last = events[-1]
    return tokens, text, last.finish_reason, last.completion_tokens, len(last.token_ids)


@pytest.mark.parametrize("stop", ["eos", "stop string", "max tokens"])
def test_stops_land_exactly_where_plain_decoding_stops_mid_acceptance(
    stop: str, windowed: Path
) -> None:
    prompt = repeating_prompts(windowed, 1, seed=2)[0]
    plain_tokens, plain_text, *_ = finals(windowed, prompt, GREEDY)
    sampling, extra = GREEDY, {}
    if stop == "eos":
        # Steps yield 6 tokens (γ = 5, all accepted): 0-5, 6-11. An EOS at 7-11 is mid-step.
        new = [t for i, t in enumerate(plain_tokens) if 7 <= i < 12 and t not in plain_tokens[:i]]
        extra["eos"] = new[0]
        sampling = SamplingParams(max_tokens=32)
    elif stop == "stop string":
        at = len(plain_text) // 2
        sampling = SamplingParams(max_tokens=32, ignore_eos=True, stop=(plain_text[at : at + 3],))
    else:
        sampling = SamplingParams(max_tokens=10, ignore_eos=True)  # inside the second step
    draft = dict(
        speculative="draft",
        draft_model=str(windowed),
        num_speculative_tokens=5,
        speculative_adaptive=False,
    )
    want = finals(windowed, prompt, sampling, **extra)
    got = finals(windowed, prompt, sampling, **draft, **extra)
    assert got[:4] == want[:4]
    assert want[2] is (FinishReason.LENGTH if stop == "max tokens" else FinishReason.STOP)
    assert want[3] < 32
    assert got[4] > 1  # the step that stopped had accepted several tokens


def test_cancel_mid_speculation_frees_target_and_draft_pages(windowed: Path) -> None:
    e = engine(
        windowed,
        speculative="draft",
        draft_model=str(windowed),
        num_pages=64,
        speculative_adaptive=False,
    )
    prompt = repeating_prompts(windowed, 1)[0]
    e.add_request("a", prompt, SamplingParams(max_tokens=200, ignore_eos=True))
    got: list[int] = []
    while len(got) < 12:
        got += [t for ev in e.step() for t in ev.token_ids]
    assert e.stats().spec_draft_pages > 0
    e.cancel("a")
    assert e.num_free_pages() == 64 and e.stats().spec_draft_pages == 0
    (final,) = e.step()
    assert final.finish_reason is FinishReason.CANCELLED and not e.has_unfinished()


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_preemption_with_speculation_gives_the_plain_tokens(method: str, windowed: Path) -> None:
    prompts = repeating_prompts(windowed, 6, seed=3)
    jobs = [(p, None) for p in prompts]
    small = dict(num_pages=40, max_batch_tokens=48)
    want = tokens_of(run_staggered(engine(windowed, **small), jobs, GREEDY))
    draft = {"draft_model": str(windowed), "draft_layers": 1} if method == "draft" else {}
    e = engine(windowed, speculative=method, speculative_adaptive=False, **small, **draft)
    assert tokens_of(run_staggered(e, jobs, GREEDY)) == want
    stats = e.stats()
    assert stats.preemptions > 0 and stats.spec_accepted > 0
    assert e.num_free_pages() == 40


def decode_drafts(plan: Plan, steps: list[int]) -> Plan:
    """plan, recording the draft tokens it adds to each decode step (no prefill rows)."""

    def spy(batch: list[ScheduledSeq], budget: int) -> list[ScheduledSeq]:
        planned = plan(batch, budget)
        if all(item.num_tokens == 1 for item in batch):
            steps.append(sum(len(item.draft) for item in planned))
        return planned

    return spy


def test_adaptive_control_drafts_when_memory_bound_and_not_when_compute_bound(
    windowed: Path,
) -> None:
    jobs = [(p, None) for p in repeating_prompts(windowed, 8, seed=4)]
    want = tokens_of(run_staggered(engine(windowed), jobs, GREEDY))
    drafted = {}
    # Memory-bound: a row costs 1/64 of a step. Compute-bound: T = N, so in a decode step
    # a row costs as much as the token it yields at best, and no draft pays.
    for name, cost in (("memory", MEMORY_BOUND), ("compute", FixedCost(0.0, 1.0))):
        e = engine(windowed, speculative="ngram")
        e.speculator.cost = cost
        steps: list[int] = []
        e.speculator.plan = decode_drafts(e.speculator.plan, steps)  # type: ignore[method-assign]
        assert tokens_of(run_staggered(e, jobs, GREEDY)) == want
        drafted[name] = steps
    assert sum(drafted["memory"]) > 0
    assert drafted["compute"] and sum(drafted["compute"]) == 0


def test_request_options_override_the_server_default(windowed: Path) -> None:
    prompt = repeating_prompts(windowed, 1, seed=5)[0]
    cases = [
        ("none", SpeculativeParams(SpecMethod.NGRAM, 2), 2),  # asked for: lookup, γ 2
        ("ngram", SpeculativeParams(SpecMethod.NONE), 0),  # asked not to
        ("ngram", None, 5),  # the server's default method and γ
    ]
    for default, asked, gamma in cases:
        e = engine(windowed, speculative=default, speculative_adaptive=False)
        e.add_request("r", prompt, GREEDY, None, asked)
        while e.has_unfinished():
            e.step()
        totals = e.stats().spec_by_adapter
        if gamma == 0:
            assert totals == {}
        else:
            (t,) = totals.values()
            assert t.proposed <= gamma * t.verified and t.proposed > (gamma - 1) * t.verified


def test_a_draft_asked_of_a_worker_without_one_is_failed_precondition(windowed: Path) -> None:
    """Not a silent fall-back to another method: the job ends FAILED_PRECONDITION, saying
    why, and the engine is left as it was."""
    e = engine(windowed, speculative="ngram")
    prompt = repeating_prompts(windowed, 1, seed=5)[0]
    with pytest.raises(NotServedHere, match="no draft model") as refused:
        e.add_request("r", prompt, GREEDY, None, SpeculativeParams(SpecMethod.DRAFT, 3))
    assert failure_of(refused.value)[0] == Code.FAILED_PRECONDITION
    assert not e.has_unfinished()
    e.add_request("r", prompt, GREEDY)  # the same id is free: nothing was half-registered
    assert e.has_unfinished()


def test_the_broker_decodes_speculative_options() -> None:
    Method = generation_pb2.SpeculativeOptions.Method
    for method, name in [
        (Method.METHOD_UNSPECIFIED, None),
        (Method.METHOD_NONE, "none"),
        (Method.METHOD_NGRAM, "ngram"),
        (Method.METHOD_DRAFT_MODEL, "draft"),
    ]:
        spec = generation_pb2.SpeculativeOptions(method=method, num_speculative_tokens=4)
        request = generation_pb2.GenerateRequest(text="x", speculative=spec)
        decoded = decode_speculative(request)
        assert decoded == {"method": name, "num_tokens": 4}
        SpeculativeParams(SpecMethod(name) if name else None, decoded["num_tokens"])
