"""LoRA ops for mixed-adapter batches: SGMV (segments) and BGMV (one adapter per row).

Torch reference implementations; Triton kernels with the same semantics come later
and are tested against these. Ranks differ per adapter and nothing is padded to a
maximum rank: the shrink output is ragged, one tensor per segment (or row group).

Notation: T tokens, S segments, `in`/`out` the projection's features, r_s the rank of
segment s's adapter, scale_s its LoRA scale (alpha/r, or alpha/sqrt(r) with rsLoRA).

    shrink:  v_s[t, j] = scale_s · Σ_i x[t, i] · A_s[i, j]        t ∈ segment s, j < r_s
    expand:  y[t, o]  += Σ_j v_s[t, j] · B_s[j, o]

together y[seg] += scale_s · (x[seg] @ A_s) @ B_s. A segment whose adapter does not
target this projection (or a base-model segment) has A_s = B_s = None and is skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


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


def sgmv_shrink(
    x: torch.Tensor,  # [T, in]
    segments: Segments,
    a: Sequence[torch.Tensor | None],  # per segment: [in, r_s] or None
    scale: Sequence[float],  # per segment
) -> list[torch.Tensor | None]:  # per segment: [len_s, r_s] or None
    out: list[torch.Tensor | None] = []
    for start, end, a_s, s in zip(segments.starts, segments.ends, a, scale, strict=True):
        out.append(None if a_s is None else torch.mm(x[start:end], a_s).mul_(s))
    return out


def sgmv_expand(
    y: torch.Tensor,  # [T, out], updated in place
    v: Sequence[torch.Tensor | None],  # per segment: [len_s, r_s] or None
    segments: Segments,
    b: Sequence[torch.Tensor | None],  # per segment: [r_s, out] or None
) -> None:
    for start, end, v_s, b_s in zip(segments.starts, segments.ends, v, b, strict=True):
        if v_s is not None and b_s is not None:
            y[start:end].addmm_(v_s, b_s)


def bgmv_shrink(
    x: torch.Tensor,  # [B, in]
    rows: Sequence[torch.Tensor],  # per group g: row indices [n_g] that share an adapter
    a: Sequence[torch.Tensor | None],  # per group: [in, r_g] or None
    scale: Sequence[float],  # per group
) -> list[torch.Tensor | None]:  # per group: [n_g, r_g] or None
    """BGMV shrink: v[b, j] = scale_{i_b} · Σ_i x[b, i] · A_{i_b}[i, j], rows in any order."""
    return [
        None if a_g is None else torch.mm(x.index_select(0, r), a_g).mul_(s)
        for r, a_g, s in zip(rows, a, scale, strict=True)
    ]


def bgmv_expand(
    y: torch.Tensor,  # [B, out], updated in place
    v: Sequence[torch.Tensor | None],  # per group: [n_g, r_g] or None
    rows: Sequence[torch.Tensor],  # per group: row indices [n_g]
    b: Sequence[torch.Tensor | None],  # per group: [r_g, out] or None
) -> None:
    """BGMV expand: y[b, o] += Σ_j v[b, j] · B_{i_b}[j, o]."""
    for v_g, r, b_g in zip(v, rows, b, strict=True):
        if v_g is not None and b_g is not None:
            y.index_add_(0, r, torch.mm(v_g, b_g))


def group_rows(row_slots: torch.Tensor) -> tuple[list[int], list[torch.Tensor]]:
    """For BGMV: the distinct slots (>= 0) of a per-row index [B] and each one's rows."""
    slots: list[int] = []
    rows: list[torch.Tensor] = []
    for slot in torch.unique(row_slots).tolist():
        if slot >= 0:
            slots.append(int(slot))
            rows.append(torch.nonzero(row_slots == slot).flatten())
    return slots, rows
