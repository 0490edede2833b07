"""Next-token sampling: greedy, temperature, top-k, top-p, per-request seeds.

Sampling is by inverse CDF: row i draws u_i ~ U[0, 1) and takes the first token whose
cumulative probability exceeds u_i. A seeded request's u for its n-th token comes from a
CPU generator seeded by (seed, n, stream), so the same seed gives the same text whatever
shares the batch, on any device (only the number u crosses to the device; the search runs
where the logits are), and a sequence that was preempted and recomputed draws exactly
what it would have drawn. `stream` keeps other consumers of randomness for a position
(speculative verification) from shifting the sequence's own draws.
"""

from __future__ import annotations

import torch

from worker.sequence import SamplingParams

MIX = 1_000_003  # odd multipliers that spread (seed, n, stream) over the generator's seeds
OWN_STREAM = 0  # the sequence's draw for its n-th token (verification uses it too)
DRAFT_STREAM = 1  # a draft model's draw of its proposal for the n-th token


def sample(
    logits: torch.Tensor,  # [N, vocab] float32
    params: list[SamplingParams],  # [N]
    draw_index: list[int],  # [N] how many tokens each sequence has drawn before
) -> list[int]:  # [N] next token ids
    return sample_tensor(logits, params, draw_index).tolist()


def sample_tensor(
    logits: torch.Tensor,  # [N, vocab] float32
    params: list[SamplingParams],  # [N]
    draw_index: list[int],  # [N]
) -> torch.Tensor:  # [N] long, on logits.device
    tokens = torch.argmax(logits, dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return tokens
    probs = torch.stack([probabilities(logits[i], params[i]) for i in rows])  # [R, vocab]
    u = torch.tensor(
        [uniform(params[i].seed, draw_index[i]) for i in rows],
        dtype=torch.float64,
        device=logits.device,
    )
    sampled = inverse_cdf(probs, u)
    index = torch.tensor(rows, dtype=torch.long, device=logits.device)
    return tokens.index_copy(0, index, sampled)


def inverse_cdf(
    probs: torch.Tensor,  # [R, vocab], rows sum to 1 (up to rounding)
    u: torch.Tensor,  # [R] float64 in [0, 1)
) -> torch.Tensor:  # [R] long: the first token whose cumulative probability exceeds u
    cdf = torch.cumsum(probs.double(), dim=-1)
    target = (u * cdf[:, -1]).unsqueeze(1)  # scaled by the total: rounding never overshoots
    index = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return index.clamp_(max=probs.shape[-1] - 1)


def uniform(seed: int | None, n: int, stream: int = 0) -> float:
    """u ∈ [0, 1) for draw n of a sequence: fixed by (seed, n, stream) when seeded."""
    if seed is None:
        return float(torch.rand(()))
    generator = torch.Generator().manual_seed((seed * MIX + n * 7919 + stream) % (2**63))
    return float(torch.rand((), generator=generator))


def probabilities(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:  # [..., vocab]
    """softmax(logits / T) restricted to the top-k tokens and the top-p nucleus, per row.

    logits: [..., vocab] float32 (one row or several rows sharing `p`, e.g. a sequence's
    verification positions)."""
    scaled = logits / p.temperature
    if 0 < p.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, p.top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always the first token).
        drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= p.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs
