"""Verification: the target model's verdict on proposed tokens, exact by construction.

A sequence with draft x_1 … x_γ is fed [t, x_1, …, x_γ] in one target forward; row j of
its logits is the target's next-token distribution p_j after t, x_1, …, x_j. The step
yields the accepted drafts x_1 … x_k and one more token from the target (k ≤ γ), so it
never yields fewer tokens than a plain decode step and never changes what is generated.

The device work is one batched call over every verified row of the batch (`verify_rows`);
the host then reads two small vectors and finds each sequence's first rejection
(`first_rejections`), one transfer per step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def verify_greedy(target: Sequence[int], draft: Sequence[int]) -> tuple[int, int]:
    """(k, token): the longest prefix of the draft equal to the target's argmax tokens
    (target: [γ + 1], the argmax of each row), and the target's token after it."""
    k = 0
    while k < len(draft) and draft[k] == target[k]:
        k += 1
    return k, int(target[k])


def accept_probability(p_x: torch.Tensor, q_x: torch.Tensor) -> torch.Tensor:
    """min(1, p(x) / q(x)) per row ([R] float64); q(x) > 0 wherever x was proposed."""
    return torch.clamp(p_x / q_x.clamp(min=torch.finfo(torch.float64).tiny), max=1.0)


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """max(0, p − q) per row ([R, vocab]): what a rejection samples from, unnormalized."""
    return torch.clamp(p - q, min=0.0)


def verify_rows(
    p: torch.Tensor,  # [R, vocab] the target's probabilities (temperature, top-k, top-p)
    q: torch.Tensor,  # [R, vocab] the proposal's probabilities (one-hot for n-gram; 0: none)
    x: torch.Tensor,  # [R] long: the proposed token of each row (any id where q is 0)
    u: torch.Tensor,  # [R] float64 in [0, 1): the sequence's own draw for that position
) -> tuple[torch.Tensor, torch.Tensor]:  # accept [R] bool, token [R] long
    """Per row: whether x is accepted, and the token to emit if the row is the first
    rejection (or the last row, which has no proposal: q = 0, never accepted).

    Speculative sampling (Leviathan et al. 2023, Chen et al. 2023). At position j the
    proposer drew x ~ q_j. Accept x with probability a = min(1, p_j(x) / q_j(x)); on
    rejection draw from r_j = max(0, p_j − q_j) / Σ max(0, p_j − q_j) and stop. Then

        P(y) = q(y) · min(1, p(y)/q(y)) + (1 − Σ_x min(p(x), q(x))) · r(y)
             = min(p(y), q(y)) + max(0, p(y) − q(y))        [Σ max(0, p − q) = 1 − Σ min(p, q)]
             = p(y),

    so every emitted token has the target's distribution. After γ acceptances the last
    row (q = 0: a = 0, r = p) samples p_γ itself. An n-gram proposal is a one-hot q:
    a = p(x), r = p without x. Temperature, top-k and top-p are already in p and q.

    One uniform per row decides both: accept iff u ∈ [c, c + a) with
    c = min(F_p(x⁻), 1 − a), F_p(x⁻) the target mass of the tokens before x. That has
    probability a whatever c (u is independent of x), and after a rejection
    u' = (u if u < c else u − a) / (1 − a) is again uniform on [0, 1) and independent of
    the decision; it picks from r by inverse CDF. With a one-hot q the accepted interval
    is x's own interval of p's CDF, so the outcome is the token plain inverse-CDF sampling
    picks with the same u: seeded n-gram speculation repeats plain seeded output.
    """
    p64, q64 = p.double(), q.double()
    cdf = torch.cumsum(p64, dim=-1)  # [R, vocab]
    total = cdf[:, -1]  # [R] (1 up to rounding)
    rows = torch.arange(p.shape[0], device=p.device)
    before = torch.where(x > 0, cdf[rows, (x - 1).clamp(min=0)], 0.0) / total  # F_p(x⁻)
    p_x = p64[rows, x] / total
    q_x = q64[rows, x]
    a = torch.where(q_x > 0, accept_probability(p_x, q_x), 0.0)  # [R]
    c = torch.minimum(before, 1.0 - a)
    accept = (u >= c) & (u < c + a)
    r = residual(p64, q64)
    r = torch.where(r.sum(dim=-1, keepdim=True) > 0, r, p64)  # p = q: never rejected
    rescaled = torch.where(u < c, u, u - a) / (1.0 - a).clamp(min=2**-53)
    rescaled = rescaled.clamp(0.0, 1.0 - 2**-53)
    r_cdf = torch.cumsum(r, dim=-1)  # [R, vocab]
    target = (rescaled * r_cdf[:, -1]).unsqueeze(1)
    token = torch.searchsorted(r_cdf, target, right=True).squeeze(1)
    return accept, token.clamp_(max=p.shape[-1] - 1)


def first_rejections(
    accept: Sequence[bool],  # [R] from verify_rows, sequences' rows concatenated
    token: Sequence[int],  # [R]
    gammas: Sequence[int],  # [S] draft length of each sequence (its rows: γ + 1)
) -> list[tuple[int, int]]:  # [S] (accepted drafts k, the token after them)
    out, row = [], 0
    for gamma in gammas:
        k = 0
        while k < gamma and accept[row + k]:
            k += 1
        out.append((k, int(token[row + k])))
        row += gamma + 1
    return out
