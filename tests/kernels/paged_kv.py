"""Random sequences' K/V scattered over the pages of a KV view, and a float64 reference.

Pages are taken from a shuffled id range, so a sequence's blocks are never adjacent in
order; every page position no sequence owns, and every other layer, is NaN, and unused
block-table entries point at a NaN page, so reading outside the context fails a test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class PagedBatch:
    q: torch.Tensor  # [T, n_heads, d]
    kv: torch.Tensor  # [P, L, 2, page_tokens, n_kv, d]
    layer: int
    block_tables: torch.Tensor  # [B, max_blocks] int32
    context_lens: torch.Tensor  # [B] int32
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    k: list[torch.Tensor]  # per sequence [ctx_b, n_kv, d] float64 (the values stored)
    v: list[torch.Tensor]


def paged_batch(
    ctx_lens: list[int],
    q_lens: list[int],
    *,
    heads: int,
    kv_heads: int,
    head_dim: int,
    page_tokens: int,
    dtype: torch.dtype,
    device: torch.device,
    gen: torch.Generator,
    layers: int = 2,
    layer: int = 1,
    spare_blocks: int = 2,  # table entries past the context (a padded block table)
) -> PagedBatch:
    blocks = [math.ceil(c / page_tokens) for c in ctx_lens]
    num_pages = sum(blocks) + 3
    order = torch.randperm(num_pages, generator=gen).tolist()
    nan_page = order.pop()  # unused table entries point here
    kv = torch.full(
        (num_pages, layers, 2, page_tokens, kv_heads, head_dim), float("nan"), dtype=dtype
    )
    tables = torch.full(
        (len(ctx_lens), max(blocks, default=0) + spare_blocks), nan_page, dtype=torch.int32
    )
    ks, vs = [], []
    for b, ctx in enumerate(ctx_lens):
        k = torch.randn(ctx, kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(ctx, kv_heads, head_dim, generator=gen).to(dtype)
        for blk in range(blocks[b]):
            page = order.pop()
            tables[b, blk] = page
            lo, hi = blk * page_tokens, min(ctx, (blk + 1) * page_tokens)
            kv[page, layer, 0, : hi - lo] = k[lo:hi]
            kv[page, layer, 1, : hi - lo] = v[lo:hi]
        ks.append(k.double())
        vs.append(v.double())
    cu = [0]
    for n in q_lens:
        cu.append(cu[-1] + n)
    q = torch.randn(cu[-1], heads, head_dim, generator=gen).to(dtype)

    def i32(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=device)

    return PagedBatch(
        q=q.to(device),
        kv=kv.to(device),
        layer=layer,
        block_tables=tables.to(device),
        context_lens=i32(ctx_lens),
        cu_seqlens_q=i32(cu),
        k=ks,
        v=vs,
    )


def attention_f64(batch: PagedBatch, window: int | None = None) -> torch.Tensor:
    """The float64 loop over sequences, query rows and heads: softmax(q·K/√d)·V, causal."""
    q = batch.q.double().cpu()
    out = torch.zeros_like(q)
    heads, kv_heads, d = q.shape[1], batch.k[0].shape[1] if batch.k else 1, q.shape[2]
    cu = batch.cu_seqlens_q.tolist()
    for b, (k, v) in enumerate(zip(batch.k, batch.v, strict=True)):
        ctx, n = k.shape[0], cu[b + 1] - cu[b]
        for j in range(n):
            p = ctx - n + j
            lo = 0 if window is None else max(0, p - window + 1)
            for h in range(heads):
                kh = h // (heads // kv_heads)
                s = k[lo : p + 1, kh] @ q[cu[b] + j, h] / math.sqrt(d)  # [c]
                out[cu[b] + j, h] = torch.softmax(s, 0) @ v[lo : p + 1, kh]
    return out
