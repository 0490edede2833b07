"""Attention over a paged KV cache (torch reference).

The cache of one layer is two flat tensors of slots, k_cache/v_cache [num_slots,
n_kv, d], where slot = page_id · page_size + offset. A sequence's context is the
slots its block table names, in order.

For query token t of sequence b at position p_t (causal):
    out[t, h] = Σ_{c ≤ p_t} softmax_c(q[t, h] · k[c, h // g] / √d) · v[c, h // g]
with g = n_heads / n_kv (grouped-query attention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def write_kv(
    k_cache: torch.Tensor,  # [num_slots, n_kv, d]
    v_cache: torch.Tensor,  # [num_slots, n_kv, d]
    k: torch.Tensor,  # [T, n_kv, d]
    v: torch.Tensor,  # [T, n_kv, d]
    slot_mapping: torch.Tensor,  # [T] long
) -> None:
    k_cache.index_copy_(0, slot_mapping, k)
    v_cache.index_copy_(0, slot_mapping, v)


def paged_attention(
    q: torch.Tensor,  # [B, Lq, n_heads, d]  (padded per sequence)
    k_cache: torch.Tensor,  # [num_slots, n_kv, d]
    v_cache: torch.Tensor,  # [num_slots, n_kv, d]
    ctx_slots: torch.Tensor,  # [B, Lk] long: slot of each context position (padded with 0)
    mask: torch.Tensor,  # [B, 1, Lq, Lk] bool: True where attention is allowed
) -> torch.Tensor:  # [B, Lq, n_heads, d]
    k = k_cache[ctx_slots]  # [B, Lk, n_kv, d]
    v = v_cache[ctx_slots]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        enable_gqa=True,
    )
    return out.transpose(1, 2)
