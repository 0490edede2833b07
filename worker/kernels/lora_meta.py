"""Per-step LoRA metadata: where every row of every adapter in the batch lives in the pool.

Built once per step by the runner (device tensors on the model's device) and read by
every layer's LoRA ops with their layer and group index; see docs/memory.md.

    n slots (distinct adapters in the step), L layers, G = 4 groups, M = 7 projections,
    T token rows, S segments, R rows of all the slots' adapters.

    shrink, group g of layer l, token row t with slot s:
        v[t, j] = Σ_i x[t, i] · pool[row_addr[a_row[s, l, g] + j] + i]          j < a_rank[s, l, g]
    expand, projection m of group g:
        y[t, c_m + o] += Σ_{j < b_rank[s,l,m]} v[t, b_col[s,l,m] + j] · pool[row_addr[b_row[s,l,m] + j] + o]

A slot that does not target a group has a_rank 0 (and a_row −1); one that does not target
a projection has b_rank 0 (and b_row −1). Rows whose slot is −1 (the base model) are
left untouched by both ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROUPS = ("qkv", "o", "gate_up", "down")  # fused projection groups, in layer order
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# group index → the indices in PROJECTIONS of its projections, in fused-output order
GROUP_PROJECTIONS: tuple[tuple[int, ...], ...] = ((0, 1, 2), (3,), (4, 5), (6,))


@dataclass(frozen=True)
class LoraStepMeta:
    pool: torch.Tensor  # [N] the page pool's buffer, flat, model dtype (weights read in place)
    row_addr: torch.Tensor  # [R] int64: flat offset in `pool` of every row of the slots' adapters
    a_row: torch.Tensor  # [n, L, G] int64: index in row_addr of the group's first A row (-1: none)
    a_rank: (
        torch.Tensor
    )  # [n, L, G] int32: the group's A rows, Σ r_m over its projections (0: none)
    b_row: (
        torch.Tensor
    )  # [n, L, M] int64: index in row_addr of projection m's first B row (-1: none)
    b_rank: torch.Tensor  # [n, L, M] int32: r_m (0: projection not targeted)
    b_col: torch.Tensor  # [n, L, M] int32: column of the shrink output where m's ranks start
    seg_start: torch.Tensor  # [S + 1] int32: first token row of each segment; seg_start[S] = T
    seg_slot: torch.Tensor  # [S] int32: adapter slot of each segment (-1: base model)
    row_slot: torch.Tensor  # [T] int32: adapter slot of each token row (-1: base model)
    max_rank: int  # max of a_rank: the width of the shrink output v [T, max_rank]
    row_align: int = 1  # every row_addr is a multiple of it (a power of two): vector loads

    @property
    def num_slots(self) -> int:
        return int(self.a_row.shape[0])
