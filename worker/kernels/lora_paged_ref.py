"""The paged LoRA ops in torch: the semantics of lora_meta.py, simply and exactly.

The reference the Triton kernels (sgmv.py, bgmv.py) are tested against, and a fallback
that runs on any device. It gathers each slot's rows through the row table once per call
and multiplies in float32; nothing about it is tuned. For layer l, group g and token row t
with slot s ≥ 0 (row_slot[t], or seg_slot of t's segment):

    shrink   v[t, j] = Σ_i x[t, i] · pool[row_addr[a_row[s, l, g] + j] + i]        j < a_rank[s, l, g]
    expand   y[t, c_p + o] += Σ_{j < b_rank[s,l,m]} v[t, b_col[s,l,m] + j] · pool[row_addr[b_row[s,l,m] + j] + o]

with m the p-th projection of the group and (c_p, w_p) = out_cols[p], o < w_p. Shapes:
x [T, in_g], v [T, max_rank] float32, zero where no row contributes (columns ≥ a_rank,
rows of slot −1); y [T, out_total] model dtype, rows of slot −1 untouched. The expand adds
in float32 and rounds once to y's dtype, like the kernels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from worker.kernels.checks import FLOAT_DTYPES, check_meta, check_out_cols, check_tensor
from worker.kernels.lora_meta import GROUP_PROJECTIONS, LoraStepMeta


def sgmv_shrink(
    x: torch.Tensor,
    meta: LoraStepMeta,
    layer: int,
    group: int,  # x [T, in_g]
) -> torch.Tensor:  # [T, max_rank] float32
    return shrink_rows(x, segment_row_slots(meta), meta, layer, group)


def sgmv_expand(
    y: torch.Tensor,  # [T, out_total], updated in place
    v: torch.Tensor,  # [T, max_rank] float32
    meta: LoraStepMeta,
    layer: int,
    group: int,
    out_cols: Sequence[tuple[int, int]],
) -> None:
    expand_rows(y, v, segment_row_slots(meta), meta, layer, group, out_cols)


def bgmv_shrink(
    x: torch.Tensor,
    meta: LoraStepMeta,
    layer: int,
    group: int,  # x [T, in_g]
) -> torch.Tensor:  # [T, max_rank] float32
    return shrink_rows(x, meta.row_slot, meta, layer, group)


def bgmv_expand(
    y: torch.Tensor,  # [T, out_total], updated in place
    v: torch.Tensor,  # [T, max_rank] float32
    meta: LoraStepMeta,
    layer: int,
    group: int,
    out_cols: Sequence[tuple[int, int]],
) -> None:
    expand_rows(y, v, meta.row_slot, meta, layer, group, out_cols)


def segment_row_slots(meta: LoraStepMeta) -> torch.Tensor:  # [T] int32
    """The slot of every token row, from the segments (seg_start, seg_slot)."""
    lengths = (meta.seg_start[1:] - meta.seg_start[:-1]).long()  # [S]
    return torch.repeat_interleave(meta.seg_slot, lengths)


def gather_rows(
    meta: LoraStepMeta, first: int, count: int, width: int
) -> torch.Tensor:  # [count, width] float32
    """Rows first .. first + count of the row table, each `width` elements of the pool."""
    starts = meta.row_addr[first : first + count]  # [count] int64
    cols = torch.arange(width, device=starts.device)
    return meta.pool[starts[:, None] + cols[None, :]].float()


def shrink_rows(
    x: torch.Tensor,  # [T, in_g]
    row_slot: torch.Tensor,  # [T] int32
    meta: LoraStepMeta,
    layer: int,
    group: int,
) -> torch.Tensor:  # [T, max_rank] float32
    check_tensor("x", x, dtype=FLOAT_DTYPES, ndim=2)
    check_meta(meta, x.device, layer, group)
    _check_rows(row_slot, x.shape[0])
    v = torch.zeros(x.shape[0], meta.max_rank, dtype=torch.float32, device=x.device)
    for slot in _slots(row_slot):
        rank = int(meta.a_rank[slot, layer, group])
        if rank == 0:
            continue
        a = gather_rows(meta, int(meta.a_row[slot, layer, group]), rank, x.shape[1])  # [r, in]
        rows = torch.nonzero(row_slot == slot).flatten()  # [n_s]
        v[rows, :rank] = x[rows].float() @ a.T
    return v


def expand_rows(
    y: torch.Tensor,  # [T, out_total], updated in place
    v: torch.Tensor,  # [T, max_rank] float32
    row_slot: torch.Tensor,  # [T] int32
    meta: LoraStepMeta,
    layer: int,
    group: int,
    out_cols: Sequence[tuple[int, int]],
) -> None:
    check_tensor("y", y, dtype=FLOAT_DTYPES, ndim=2)
    check_tensor("v", v, dtype=torch.float32, device=y.device, ndim=2)
    check_meta(meta, y.device, layer, group)
    _check_rows(row_slot, y.shape[0])
    parts = check_out_cols(out_cols, group, y.shape[1])
    for slot in _slots(row_slot):
        rows = torch.nonzero(row_slot == slot).flatten()  # [n_s]
        for m, (first_col, width) in zip(GROUP_PROJECTIONS[group], parts, strict=True):
            rank = int(meta.b_rank[slot, layer, m])
            if rank == 0:
                continue
            b = gather_rows(meta, int(meta.b_row[slot, layer, m]), rank, width)  # [r, w]
            col = int(meta.b_col[slot, layer, m])
            out = y[rows, first_col : first_col + width].float()  # [n_s, w]
            out += v[rows, col : col + rank] @ b
            y[rows, first_col : first_col + width] = out.to(y.dtype)


def _slots(row_slot: torch.Tensor) -> list[int]:
    """The distinct adapter slots (≥ 0) among the rows."""
    return [int(s) for s in torch.unique(row_slot).tolist() if s >= 0]


def _check_rows(row_slot: torch.Tensor, tokens: int) -> None:
    if row_slot.shape != (tokens,):
        raise ValueError(f"row slots: shape {tuple(row_slot.shape)}, expected [{tokens}]")
