"""Next-token sampling: greedy, temperature, top-k, top-p, per-request seeds.

A seeded request draws its n-th token from a generator seeded by (seed, n), so the
same seed gives the same text whatever else shares the batch, and a sequence that
was preempted and recomputed draws exactly what it would have drawn.
"""

from __future__ import annotations

import torch

from worker.sequence import SamplingParams


def sample(
    logits: torch.Tensor,  # [N, vocab] float32
    params: list[SamplingParams],  # [N]
    draw_index: list[int],  # [N] how many tokens each sequence has drawn before
) -> list[int]:  # [N] next token ids
    tokens = torch.argmax(logits, dim=-1).tolist()
    for row, (p, n) in enumerate(zip(params, draw_index, strict=True)):
        if not p.greedy:
            probs = probabilities(logits[row], p)
            tokens[row] = int(torch.multinomial(probs, 1, generator=_generator(p.seed, n)))
    return tokens


def probabilities(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:  # [vocab]
    """softmax(logits / T) restricted to the top-k tokens and the top-p nucleus."""
    scaled = logits / p.temperature
    if 0 < p.top_k < scaled.numel():
        kth = torch.topk(scaled, p.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always the first token).
        drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= p.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        probs = probs / probs.sum()
    return probs


def _generator(seed: int | None, n: int) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator().manual_seed((seed * 1_000_003 + n) % (2**63))
