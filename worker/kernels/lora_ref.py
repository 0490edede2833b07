"""LoRA ops for mixed-adapter batches: SGMV (segments) and BGMV (one adapter per row).

Torch reference implementations over contiguous weights (on the CPU, views of the page
pool); the paged ops of lora_paged_ref.py and the Triton kernels have the same
semantics. Ranks differ per adapter and nothing is padded to a maximum rank: the shrink
output is ragged, one tensor per segment (or row group).

Notation: T tokens, S segments, `in`/`out` the projection's features, r_s the rank of
segment s's adapter, scale_s its LoRA scale (alpha/r, or alpha/sqrt(r) with rsLoRA).

    shrink:  v_s[t, j] = scale_s · Σ_i x[t, i] · A_s[j, i]        t ∈ segment s, j < r_s
    expand:  y[t, o]  += Σ_j v_s[t, j] · B_s[j, o]

together y[seg] += scale_s · (x[seg] @ A_sᵀ) @ B_s. A is kept as [r, in], PEFT's
lora_A layout (on the CPU, x @ Aᵀ on that layout is ~80x faster than x @ A on an
[in, r] copy for one-row inputs with two threads). A segment whose adapter does not
target this projection (or a base-model segment) has A_s = B_s = None and is skipped.

Projections that share an input (q, k, v; gate, up) shrink once with their A
matrices stacked, A_s = [A_q; A_k; A_v] ([r_q + r_k + r_v, in]); expand then has one part per
projection: the part's columns of v, its B, and the columns of the fused output y
it adds into. A scale of 1.0 (the caller folded it into B) costs nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Segments:
    """Runs of consecutive token rows that share one adapter slot (-1: base model)."""

    starts: tuple[int, ...]  # [S] first row of each segment
    ends: tuple[int, ...]  # [S] one past the last row
    slots: tuple[int, ...]  # [S] adapter slot of each segment, -1 for none

    @staticmethod
    def from_rows(row_slots: Sequence[int]) -> Segments:
        """Group a per-row slot list (already sorted into runs) into segments."""
        starts: list[int] = []
        ends: list[int] = []
        slots: list[int] = []
        for t, slot in enumerate(row_slots):
            if slots and slots[-1] == slot:
                ends[-1] = t + 1
            else:
                starts.append(t)
                ends.append(t + 1)
                slots.append(slot)
        return Segments(tuple(starts), tuple(ends), tuple(slots))


@dataclass(frozen=True)
class ExpandPart:
    """One projection inside a fused expand: y[:, out_cols] += v[:, rank_cols] @ b."""

    rank_cols: slice  # columns of the shrink output v this part reads (its r)
    out_cols: slice  # columns of y it adds into
    b: torch.Tensor  # [r, out]


def sgmv_shrink(
    x: torch.Tensor,  # [T, in]
    segments: Segments,
    a: Sequence[torch.Tensor | None],  # per segment: [r_s, in] or None
    scale: Sequence[float],  # per segment
) -> list[torch.Tensor | None]:  # per segment: [len_s, r_s] or None
    out: list[torch.Tensor | None] = []
    for start, end, a_s, s in zip(segments.starts, segments.ends, a, scale, strict=True):
        v_s = None if a_s is None else F.linear(x[start:end], a_s.to(x.dtype))
        out.append(v_s if v_s is None or s == 1.0 else v_s.mul_(s))
    return out


def sgmv_expand(
    y: torch.Tensor,  # [T, out], updated in place
    v: Sequence[torch.Tensor | None],  # per segment: [len_s, r_s] or None
    segments: Segments,
    parts: Sequence[Sequence[ExpandPart]],  # per segment: its projections' parts
) -> None:
    for start, end, v_s, parts_s in zip(segments.starts, segments.ends, v, parts, strict=True):
        if v_s is not None:
            for p in parts_s:
                y[start:end, p.out_cols].addmm_(v_s[:, p.rank_cols], p.b.to(y.dtype))


def bgmv_shrink(
    x: torch.Tensor,  # [B, in]
    rows: Sequence[torch.Tensor],  # per group g: row indices [n_g] that share an adapter
    a: Sequence[torch.Tensor | None],  # per group: [r_g, in] or None
    scale: Sequence[float],  # per group
) -> list[torch.Tensor | None]:  # per group: [n_g, r_g] or None
    """BGMV shrink: v[b, j] = scale_{i_b} · Σ_i x[b, i] · A_{i_b}[j, i], rows in any order."""
    out: list[torch.Tensor | None] = []
    for r, a_g, s in zip(rows, a, scale, strict=True):
        v_g = None if a_g is None else F.linear(x.index_select(0, r), a_g)
        out.append(v_g if v_g is None or s == 1.0 else v_g.mul_(s))
    return out


def bgmv_expand(
    y: torch.Tensor,  # [B, out], updated in place
    v: Sequence[torch.Tensor | None],  # per group: [n_g, r_g] or None
    rows: Sequence[torch.Tensor],  # per group: row indices [n_g]
    parts: Sequence[Sequence[ExpandPart]],  # per group: its projections' parts
) -> None:
    """BGMV expand: y[b, o] += Σ_j v[b, j] · B_{i_b}[j, o]."""
    for v_g, r, parts_g in zip(v, rows, parts, strict=True):
        if v_g is not None:
            for p in parts_g:
                y[:, p.out_cols].index_add_(0, r, torch.mm(v_g[:, p.rank_cols], p.b))


def group_rows(row_slots: torch.Tensor) -> tuple[list[int], list[torch.Tensor]]:
    """For BGMV: the distinct slots (>= 0) of a per-row index [B] and each one's rows."""
    slots: list[int] = []
    rows: list[torch.Tensor] = []
    for slot in torch.unique(row_slots).tolist():
        if slot >= 0:
            slots.append(int(slot))
            rows.append(torch.nonzero(row_slots == slot).flatten())
    return slots, rows
