"""Attention over the paged KV cache in torch: the semantics of paged_attention.py, simply.

kv [P, L, 2, page_tokens, n_kv, d] is the page pool's KV view; sequence b's context is
context_lens[b] positions, position c in page block_tables[b, c // pt] at offset c % pt;
its queries are rows cu_seqlens_q[b] .. cu_seqlens_q[b+1] of q, query j at position
p = context_lens[b] − q_len_b + j. With g = n_heads / n_kv and an optional window w:

    out[t, h] = Σ_{c ≤ p, c > p − w} softmax_c(scale · q[t, h] · K[c, h // g]) · V[c, h // g]

One sequence at a time, gathering its pages, in float32; rows of a sequence with no
context get zeros. The reference the Triton kernels are tested against.
"""

from __future__ import annotations

import math

import torch

from worker.kernels.checks import FLOAT_DTYPES, check_tensor


def paged_attention(
    q: torch.Tensor,  # [T, n_heads, d]
    kv: torch.Tensor,  # [P, L, 2, page_tokens, n_kv, d]
    layer: int,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    context_lens: torch.Tensor,  # [B] int32
    cu_seqlens_q: torch.Tensor,  # [B + 1] int32
    *,
    window: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:  # [T, n_heads, d] in q's dtype
    check_tensor("q", q, dtype=FLOAT_DTYPES, ndim=3)
    check_tensor("kv", kv, dtype=q.dtype, device=q.device, ndim=6)
    out = torch.zeros_like(q)
    scale = scale or 1 / math.sqrt(q.shape[2])
    cu = cu_seqlens_q.tolist()
    for b, ctx in enumerate(context_lens.tolist()):
        lo, hi = cu[b], cu[b + 1]
        if hi > lo and ctx > 0:
            k, v = gather_context(kv, layer, block_tables[b], ctx)  # [ctx, n_kv, d] each
            out[lo:hi] = sequence_attention(q[lo:hi], k, v, window, scale).to(q.dtype)
    return out


def gather_context(
    kv: torch.Tensor,
    layer: int,
    table: torch.Tensor,
    ctx: int,  # table [max_blocks]
) -> tuple[torch.Tensor, torch.Tensor]:  # K, V [ctx, n_kv, d]
    page_tokens = kv.shape[3]
    pages = table[: (ctx + page_tokens - 1) // page_tokens].long()  # [n_pages]
    k = kv[pages, layer, 0].flatten(0, 1)[:ctx]  # [ctx, n_kv, d]
    v = kv[pages, layer, 1].flatten(0, 1)[:ctx]
    return k, v


def sequence_attention(
    q: torch.Tensor,  # [n, n_heads, d]: the last n positions of the context
    k: torch.Tensor,  # [ctx, n_kv, d]
    v: torch.Tensor,  # [ctx, n_kv, d]
    window: int | None,
    scale: float,
) -> torch.Tensor:  # [n, n_heads, d] float32
    n, ctx = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    pos = torch.arange(ctx - n, ctx, device=q.device)[:, None]  # [n, 1] query positions
    c = torch.arange(ctx, device=q.device)[None, :]  # [1, ctx]
    allowed = (c <= pos) & (c > pos - (window or ctx + n))  # [n, ctx]
    kh = k.float().repeat_interleave(group, dim=1)  # [ctx, n_heads, d]
    vh = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), kh) * scale  # [n_heads, n, ctx]
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, vh)
