"""Speculation's pure pieces on the CPU: n-gram lookup, verification math, adaptive control,
the draft cache's geometry."""

from __future__ import annotations

import pytest
import torch

from worker.memory.draft_kv import DraftGeometry
from worker.memory.geometry import PageGeometry
from worker.sampling import inverse_cdf
from worker.speculative import verify
from worker.speculative.control import AcceptanceStats, Candidate, StepCost, plan_depths
from worker.speculative.ngram import NgramIndex
from worker.speculative.verify import first_rejections, verify_greedy, verify_rows


def test_ngram_continues_the_latest_occurrence_of_the_longest_suffix() -> None:
    index = NgramIndex(max_n=3, min_n=1)
    index.extend([1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 1, 2, 3])
    # (1, 2, 3) occurred at 0 (then 4 5 9); (2, 3) later at 6 (then 7) is shorter: 3-gram wins.
    assert index.propose(3) == ([4, 5, 9], 3)
    index.extend([6])
    # suffix (2, 3, 6), (3, 6) unseen; (6,) unseen: nothing.
    assert index.propose(4) == ([], 0)
    index.extend([2, 3])
    # (6, 2, 3) unseen, (2, 3) latest at 11 (then 6): the latest occurrence.
    assert index.propose(2) == ([6, 2], 2)
    assert index.propose(0) == ([], 0)


def test_ngram_sync_catches_up_incrementally_like_a_full_build() -> None:
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 6, (40,), generator=gen).tolist()
    output = torch.randint(0, 6, (30,), generator=gen).tolist()
    whole = NgramIndex()
    whole.extend(prompt + output)
    step = NgramIndex()
    for n in range(0, 31, 7):
        step.sync(prompt, output[:n])
    step.sync(prompt, output)
    assert step.tokens == whole.tokens
    assert step.propose(5) == whole.propose(5) != ([], 0)


def test_greedy_verification_accepts_the_longest_matching_prefix() -> None:
    assert verify_greedy([5, 6, 7, 8], [5, 6, 9]) == (2, 7)
    assert verify_greedy([5, 6, 7, 8], [5, 6, 7]) == (3, 8)  # all accepted: the bonus token
    assert verify_greedy([4, 6], [5]) == (0, 4)


def exact_output(p: torch.Tensor, q: torch.Tensor, grid: int = 4000) -> torch.Tensor:
    """The distribution of verify_rows' first emitted token over x ~ q and u on a fine
    stratified grid: P(y) = Σ_x q(x) · mean_u [token = y]."""
    vocab = p.shape[0]
    u = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    out = torch.zeros(vocab, dtype=torch.float64)
    for x in range(vocab):
        if q[x] == 0:
            continue
        zero = torch.zeros(vocab)
        ps = torch.stack([p, p]).repeat(grid, 1)  # rows: (draft, bonus) per u
        qs = torch.stack([q, zero]).repeat(grid, 1)
        xs = torch.tensor([x, 0]).repeat(grid)
        us = u.repeat_interleave(2)
        accept, token = verify_rows(ps, qs, xs, us)
        first = torch.where(accept[0::2], torch.tensor(x), token[0::2])
        out += q[x].double() * torch.bincount(first, minlength=vocab).double() / grid
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_speculative_sampling_emits_the_target_distribution(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(6, generator=gen) * 2, 0)
    q = torch.softmax(torch.randn(6, generator=gen) * 2, 0)
    q[3] = 0.0  # the draft never proposes 3; p keeps mass there
    q = q / q.sum()
    assert torch.allclose(exact_output(p, q), p.double(), atol=2e-3)


def test_a_wrong_residual_changes_the_distribution(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, generator=gen) * 2, 0)
    q = torch.softmax(torch.randn(6, generator=gen) * 2, 0)
    monkeypatch.setattr(verify, "residual", lambda p, q: p)  # resample from p: biased
    assert (exact_output(p, q) - p.double()).abs().max() > 0.02


def test_one_hot_verification_picks_what_plain_sampling_picks() -> None:
    """An n-gram proposal (one-hot q) with the sequence's own u gives exactly the token of
    plain inverse-CDF sampling: accepted iff that token is the proposal."""
    gen = torch.Generator().manual_seed(3)
    rows, vocab = 400, 50
    p = torch.softmax(torch.randn(rows, vocab, generator=gen) * 3, -1)
    x = torch.randint(0, vocab, (rows,), generator=gen)
    x[::2] = p[::2].argmax(-1)  # half the proposals are the likely token
    q = torch.zeros(rows, vocab).scatter_(1, x[:, None], 1.0)
    u = torch.rand(rows, generator=gen, dtype=torch.float64)
    plain = inverse_cdf(p, u)
    accept, token = verify_rows(p, q, x, u)
    assert torch.equal(accept, plain == x)
    assert torch.equal(token[~accept], plain[~accept])
    assert 0 < int(accept.sum()) < rows


def test_first_rejections_reads_each_sequence_up_to_its_first_rejection() -> None:
    accept = [True, True, False, True, False, True]
    token = [10, 11, 12, 13, 20, 21]
    # seq A: γ = 3 (rows 0-3), rejected at 2; seq B: γ = 1 (rows 4-5), rejected at 0.
    assert first_rejections(accept, token, [3, 1]) == [(2, 12), (0, 20)]
    assert first_rejections([True, True, False], [1, 2, 3], [2]) == [(2, 3)]


def test_acceptance_estimates_follow_the_sequence_and_shrink_to_its_group() -> None:
    stats = AcceptanceStats(prior=0.8)
    group, total = ("upper", "ngram3"), ("upper", "ngram")
    assert stats.rate("new", group) == pytest.approx(0.8)  # untried: optimistic
    for _ in range(6):
        stats.record("good", group, total, 4, 4)  # every draft accepted
        stats.record("bad", group, total, 0, 4)
    good, bad, new = (stats.rate(r, group) for r in ("good", "bad", "new"))
    assert good > 0.8 and bad < 0.25 and bad < new < good
    assert stats.totals[total].proposed == 48 and stats.totals[total].accepted == 24
    for _ in range(6):
        stats.record("bad", group, total, 0, 4)
    low = stats.rate("new", group)
    for _ in range(2000):
        stats.age()  # an idle group drifts back towards the prior: it gets tried again
    assert low < stats.rate("new", group) == pytest.approx(0.8, abs=0.05)


def table(points: dict[int, float]) -> StepCost:
    cost = StepCost()
    for rows, seconds in points.items():
        cost.observe(rows, seconds)
    return cost


def test_step_cost_interpolates_what_it_saw_and_extrapolates_optimistically() -> None:
    assert StepCost().seconds(17) == pytest.approx(2.0)  # nothing seen: 1 + 16/16 steps
    cost = table({1: 0.1, 2: 0.18, 9: 0.22})
    assert cost.seconds(2) == pytest.approx(0.18)
    assert cost.seconds(5) == pytest.approx(0.18 + 3 / 7 * 0.04)
    assert cost.seconds(25) == pytest.approx(0.22 * (1 + 16 / 16))
    cost.observe(2, 0.28)  # a decayed mean: recent steps count more
    assert 0.18 < cost.seconds(2) < 0.28


# A CPU step: 1 row is a GEMV; 2-4 rows a slow GEMM; more rows nearly free until ~16.
CPU = {1: 0.10, 2: 0.18, 3: 0.2, 5: 0.2, 9: 0.22, 16: 0.3, 17: 0.33, 24: 0.45, 32: 0.6}


def test_plan_drafts_long_when_confident_and_not_at_all_when_unsure() -> None:
    cost = table(CPU)
    # Batch 1: 8 confident drafts yield ~5 tokens for 2.2 steps' time.
    assert plan_depths([Candidate(0.9, 8)], 1, 1, cost) == [8]
    # The first draft row costs 0.8 of a step: a 1-gram guess (α 0.3) never pays.
    assert plan_depths([Candidate(0.3, 8)], 1, 1, cost) == [0]
    # 16 decodes: more rows cost nearly their share of a compute-bound step.
    assert plan_depths([Candidate(0.6, 8)] * 16, 16, 16, cost) == [0] * 16
    # The budget caps the rows; the better sequence gets them first.
    depths = plan_depths([Candidate(0.95, 8), Candidate(0.9, 8)], 2, 2, table({2: 0.1}), budget=5)
    assert sum(depths) == 5 and depths[0] >= depths[1]


def test_a_draft_pass_cost_shortens_the_plan() -> None:
    cost = table({1: 0.1, 9: 0.11})
    free = plan_depths([Candidate(0.7, 8)], 1, 1, cost)
    dear = plan_depths([Candidate(0.7, 8)], 1, 1, cost, draft_pass=0.03)
    assert dear[0] < free[0]


def test_a_draft_block_fills_a_page_exactly_or_is_refused() -> None:
    smollm2 = PageGeometry(num_layers=30, page_tokens=16, num_kv_heads=3, head_dim=64, itemsize=4)
    for layers, tokens in [(1, 480), (2, 240), (4, 120), (6, 80), (30, 16)]:
        assert DraftGeometry.fit(smollm2, layers, 192).block_tokens == tokens
    with pytest.raises(ValueError, match="does not divide a page"):
        DraftGeometry.fit(smollm2, 7, 192)
    buffer = torch.zeros(3, smollm2.page_elems)
    rows = DraftGeometry.fit(smollm2, 4, 192).kv_rows(buffer)
    assert rows.shape == (3 * 4 * 2 * 120, 192) and rows.data_ptr() == buffer.data_ptr()


def test_worker_flags_and_environment_set_the_server_default() -> None:
    from worker.__main__ import engine_config, parser

    flags = parser().parse_args(["--speculative", "ngram", "--num-speculative-tokens", "7"])
    config = engine_config(flags, {})
    assert (config.speculative, config.num_speculative_tokens) == ("ngram", 7)
    env = {
        "LORAPOOL_SPECULATIVE": "draft",
        "LORAPOOL_DRAFT_MODEL": "smollm2-135m-instruct",
        "LORAPOOL_DRAFT_LAYERS": "4",
    }
    config = engine_config(parser().parse_args([]), env)
    assert (config.speculative, config.draft_model, config.draft_layers) == (
        "draft",
        "smollm2-135m-instruct",
        4,
    )
    assert engine_config(parser().parse_args([]), {}).speculative == "none"
    with pytest.raises(ValueError, match="needs a draft_model"):
        engine_config(parser().parse_args(["--speculative", "draft"]), {})
