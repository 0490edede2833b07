"""BGMV on the CPU: one-row segments of many adapters as a few gathered products.

Every adapter row starts at a multiple of the pool's granule γ (the gcd of the model's
widths, which divides every row width and the page size), so the pool viewed as a table
of γ-wide rows addresses any adapter row as w/γ consecutive table rows. For B token rows
whose adapters share one layout (a bucket), each with its own adapter:

    shrink:  v[b, j]   = Σ_i x[b, i] · A_b[j, i]          A_b = table[a_index[b]]  [R, in]
    expand:  y[b, c_m + o] += Σ_j v[b, col_m + j] · B_bm[j, o]     B_bm = table[b_index_m[b]]

The shrink gathers every row's A at once and applies it with one bmm; the expand is a
weighted sum of pool rows, which one embedding_bag computes reading B in place. A handful
of ops per layer and group for the whole bucket, where one small matmul per row cost more
in dispatch than in arithmetic. Weights are read through the row table: nothing is kept
outside the pool, and no layout is padded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GatherBucket:
    """Token rows whose adapters share one layout; their table-row indices for every layer."""

    rows: torch.Tensor  # [nb] long: token rows, each with its own adapter
    a_index: tuple[torch.Tensor | None, ...]  # per group: [nb, Σ_l K_l] long table rows
    a_offsets: tuple[tuple[int, ...], ...]  # per group: start of each layer's K_l (+ end)
    a_rank: tuple[tuple[int, ...], ...]  # per group, per layer: R (0: untargeted)
    b_index: tuple[torch.Tensor | None, ...]  # per projection: [nb, Σ_l K_l] long
    b_offsets: tuple[tuple[int, ...], ...]  # per projection: per-layer starts (+ end)
    b_rank: tuple[tuple[int, ...], ...]  # per projection, per layer: r_m
    b_col: tuple[tuple[int, ...], ...]  # per projection, per layer: first column in v


def shrink(
    table: torch.Tensor,  # [pool elements / γ, γ]
    x: torch.Tensor,  # [nb, in]
    index: torch.Tensor,  # [nb, K] long: table rows of each row's A (K = R · in / γ)
    rank: int,  # R
) -> torch.Tensor:  # [nb, R]
    """One gather of every row's A, then one batched matrix-vector product (no temporary
    of the product's size: the gather is read once more, by the bmm)."""
    nb, width = x.shape
    a = table.index_select(0, index.reshape(-1)).view(nb, rank, width).to(x.dtype)
    return torch.bmm(a, x.unsqueeze(2)).squeeze(2)


def expand(
    table: torch.Tensor,  # [pool elements / γ, γ]
    v: torch.Tensor,  # [nb, r]
    index: torch.Tensor,  # [nb, K] long: table rows of each row's B (K = r · out / γ),
    #                       chunk-major per row: index[b, c · r + j] holds B_b[j, cγ:(c+1)γ]
    out_width: int,
) -> torch.Tensor:  # [nb, out]: Σ_j v[b, j] · B_b[j, :]
    """A weighted sum of pool rows, which embedding_bag computes in place: bag (b, c) sums
    table[index[b, c · r + j]] · v[b, j] over j. B is read once, straight from the pool;
    nothing of B's size is gathered or multiplied out."""
    nb, rank = v.shape
    chunks = out_width // table.shape[1]
    bags = index.reshape(nb * chunks, rank)
    weights = v.unsqueeze(1).expand(nb, chunks, rank).reshape(nb * chunks, rank)
    if table.dtype != v.dtype:  # narrower stored rows (EngineConfig.lora_dtype): widen first
        rows = table.index_select(0, bags.reshape(-1)).view(nb * chunks, rank, -1).to(v.dtype)
        return torch.bmm(weights.unsqueeze(1), rows).view(nb, out_width)
    summed = torch.nn.functional.embedding_bag(
        bags, table, mode="sum", per_sample_weights=weights.contiguous()
    )
    return summed.view(nb, out_width)


def apply(
    table: torch.Tensor,  # [pool elements / γ, γ]
    x: torch.Tensor,  # [T, in]
    y: torch.Tensor,  # [T, fused out], updated in place
    bucket: GatherBucket,
    layer: int,
    group: int,
    projections: tuple[int, ...],  # the group's projection indices
    out_cols: tuple[slice, ...],  # each projection's columns of y
) -> None:
    """y[rows] += LoRA of each row's own adapter, for one layer and group."""
    index = bucket.a_index[group]
    rank = bucket.a_rank[group][layer]
    if index is None or rank == 0:
        return
    start, stop = bucket.a_offsets[group][layer], bucket.a_offsets[group][layer + 1]
    xs = x.index_select(0, bucket.rows)  # [nb, in]
    v = shrink(table, xs, index[:, start:stop], rank)  # [nb, R]
    deltas: list[tuple[slice, torch.Tensor]] = []
    for p, cols in zip(projections, out_cols, strict=True):
        r = bucket.b_rank[p][layer]
        b_index = bucket.b_index[p]
        if r == 0 or b_index is None:
            continue
        lo, hi = bucket.b_offsets[p][layer], bucket.b_offsets[p][layer + 1]
        col = bucket.b_col[p][layer]
        delta = expand(table, v[:, col : col + r], b_index[:, lo:hi], cols.stop - cols.start)
        deltas.append((cols, delta))
    # Every projection of the group (their columns tile y's): one scatter of whole rows.
    if len(deltas) == len(out_cols) and out_cols[-1].stop == y.shape[1]:
        y.index_add_(0, bucket.rows, torch.cat([d for _, d in deltas], dim=1))
    else:
        for cols, delta in deltas:
            y[:, cols].index_add_(0, bucket.rows, delta)
