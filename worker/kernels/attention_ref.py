"""Attention over the page pool's KV cache (torch reference, the CPU path).

The cache is the pool viewed as rows of kv_size = n_kv · d elements: the K of position
`off` of page `p` in layer `l` is row ((p · L + l) · 2 + 0) · page_tokens + off, its V the
row page_tokens further (docs/memory.md). A step computes every token's layer-0 K row once;
layer l adds l · 2 · page_tokens.

For query token t of sequence b at position p_t (causal, optional window w):
    out[t, h] = Σ_{c ≤ p_t, c > p_t − w} softmax_c(q[t, h] · k[c, h // g] / √d) · v[c, h // g]
with g = n_heads / n_kv (grouped-query attention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def write_kv(
    kv_rows: torch.Tensor,  # [pages · L · 2 · page_tokens, kv_size]: the pool as KV rows
    k: torch.Tensor,  # [T, n_kv, d]
    v: torch.Tensor,  # [T, n_kv, d]
    k_rows: torch.Tensor,  # [T] long: the K row of each token in this layer
    v_rows: torch.Tensor,  # [T] long
) -> None:
    kv_rows.index_copy_(0, k_rows, k.reshape(k.shape[0], -1))
    kv_rows.index_copy_(0, v_rows, v.reshape(v.shape[0], -1))


def paged_attention(
    q: torch.Tensor,  # [B, Lq, n_heads, d]  (padded per sequence)
    kv_rows: torch.Tensor,  # [rows, kv_size]
    k_rows: torch.Tensor,  # [B, Lk] long: K row of each context position (padded with 0)
    v_rows: torch.Tensor,  # [B, Lk] long
    mask: torch.Tensor,  # [B, 1, Lq, Lk] bool: True where attention is allowed
) -> torch.Tensor:  # [B, Lq, n_heads, d]
    b, lk = k_rows.shape
    shape = (b, lk, -1, q.shape[-1])
    k = kv_rows.index_select(0, k_rows.flatten()).view(shape)  # [B, Lk, n_kv, d]
    v = kv_rows.index_select(0, v_rows.flatten()).view(shape)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        enable_gqa=True,
    )
    return out.transpose(1, 2)
