"""Speculative sampling keeps the target distribution: a chi-square test over many seeds.

A tiny target with a 16-token vocabulary and a different tiny draft model (q ≠ p, so
drafts are often rejected and the residual max(0, p − q) is sampled). Each of N seeded
requests samples 3 tokens with γ = 2 drafts per step (the prefill step verifies drafts
too, so the very first token goes through verification). The first and second tokens'
frequencies are tested against the exact distributions computed from the target with HF
transformers: p_1, and Σ_t p_1(t) · p_2(· | t). Deliberately wrong rules fail the test.
The seeds are fixed, so the statistics (and the verdicts) are deterministic.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from worker.config import EngineConfig
from worker.engine import Engine, EngineStats
from worker.sampling import probabilities
from worker.sequence import SamplingParams
from worker.speculative import verify

PROMPT = [3, 4, 5, 6]
N = 2000
CASES = {
    "plain": SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True),
    "top-k-top-p": SamplingParams(
        temperature=1.5, top_k=6, top_p=0.9, max_tokens=3, ignore_eos=True
    ),
}


@pytest.fixture
def models(tiny_model: Callable[..., Path]) -> tuple[Path, Path]:
    target = tiny_model("llama", seed=0, vocab_size=16)
    draft = tiny_model("llama", seed=1, vocab_size=16, num_hidden_layers=1)
    return target, draft


def exact(target: Path, sampling: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """p_1 and the marginal of the second token, [16] each, in float64."""
    model = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32).eval()
    with torch.no_grad():
        first = model(torch.tensor([PROMPT])).logits[0, -1]
        p1 = probabilities(first, sampling).double()
        after = torch.tensor([[*PROMPT, t] for t in range(16)])
        p2 = probabilities(model(after).logits[:, -1], sampling).double()  # [16, 16]
    return p1, p1 @ p2


def sampled(
    target: Path, sampling: SamplingParams, **config: object
) -> tuple[torch.Tensor, EngineStats]:
    """[N, 3] tokens of N requests seeded 0 … N − 1, and the engine's counters."""
    engine = Engine.from_config(
        EngineConfig(model=str(target), max_num_seqs=400, page_size=4, num_pages=4096, **config)  # type: ignore[arg-type]
    )
    seeded = [
        SamplingParams(
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            seed=seed,
            max_tokens=3,
            ignore_eos=True,
        )
        for seed in range(N)
    ]
    for seed, params in enumerate(seeded):
        engine.add_request(f"r{seed}", PROMPT, params)
    tokens: dict[str, list[int]] = {f"r{seed}": [] for seed in range(N)}
    while engine.has_unfinished():
        for event in engine.step():
            tokens[event.request_id] += event.token_ids
    return torch.tensor([tokens[f"r{seed}"] for seed in range(N)]), engine.stats()


def chi_square_p_value(tokens: torch.Tensor, p: torch.Tensor) -> float:
    """Pearson's test of observed tokens against p; cells expecting < 5 are pooled."""
    observed = torch.bincount(tokens, minlength=p.numel()).double()
    expected = p * tokens.numel()
    big = expected >= 5
    obs = torch.cat([observed[big], observed[~big].sum().reshape(1)])
    exp = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), stat / 2))


DRAFT = dict(speculative="draft", num_speculative_tokens=2, speculative_adaptive=False)


@pytest.mark.parametrize("case", CASES)
def test_sampling_with_a_draft_model_keeps_the_target_distribution(
    case: str, models: tuple[Path, Path]
) -> None:
    target, draft = models
    p1, p2 = exact(target, CASES[case])
    for config in ({}, dict(DRAFT, draft_model=str(draft))):  # plain, then speculative
        tokens, stats = sampled(target, CASES[case], **config)
        assert chi_square_p_value(tokens[:, 0], p1) > 1e-3
        assert chi_square_p_value(tokens[:, 1], p2) > 1e-3
    # Steps verified up to 2 drafts (fewer where max_tokens leaves less room); many were
    # rejected (the residual was sampled), many accepted.
    assert stats.spec_proposed > 1.5 * stats.spec_by_adapter[("", "draft")].verified
    assert 0.2 * stats.spec_proposed < stats.spec_accepted < 0.8 * stats.spec_proposed


WRONG = {
    "accept every draft": ("accept_probability", lambda p_x, q_x: torch.ones_like(p_x)),
    "resample from p, not max(0, p - q)": ("residual", lambda p, q: p),
}


@pytest.mark.parametrize("rule", WRONG)
def test_a_wrong_acceptance_rule_fails_the_test(
    rule: str, models: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    target, draft = models
    p1, _ = exact(target, CASES["plain"])
    name, wrong = WRONG[rule]
    monkeypatch.setattr(verify, name, wrong)
    tokens, _ = sampled(target, CASES["plain"], **DRAFT, draft_model=str(draft))
    assert chi_square_p_value(tokens[:, 0], p1) < 1e-6
