"""The static tensors a decode graph reads (worker/decode_graphs.py): fixed addresses,
overwritten by every step that replays a graph.

    StaticInputs   per row, sized for the largest bucket: tokens, positions, KV slots,
                   block tables [B_max, W], context lengths, adapter slots
    StaticTables   the slots' adapter row tables (LoraStepMeta's per-adapter part), copied
                   in only when a step's tables are not the ones copied last
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.kernels.lora_meta import GROUPS, PROJECTIONS, LoraStepMeta


@dataclass
class StaticTables:
    """The slots' row tables at fixed addresses (LoraStepMeta's per-adapter part)."""

    row_addr: torch.Tensor  # [R_cap] int64
    a_row: torch.Tensor  # [n_cap, L, G] int64
    a_rank: torch.Tensor  # [n_cap, L, G] int32
    b_row: torch.Tensor  # [n_cap, L, M] int64
    b_rank: torch.Tensor  # [n_cap, L, M] int32
    b_col: torch.Tensor  # [n_cap, L, M] int32
    source: tuple[torch.Tensor, ...] = ()  # the step tables last copied in (identity)

    @staticmethod
    def empty(rows: int, slots: int, layers: int, device: torch.device) -> StaticTables:
        def table(width: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(slots, layers, width, dtype=dtype, device=device)

        g, m = len(GROUPS), len(PROJECTIONS)
        return StaticTables(
            row_addr=torch.zeros(rows, dtype=torch.int64, device=device),
            a_row=table(g, torch.int64),
            a_rank=table(g, torch.int32),
            b_row=table(m, torch.int64),
            b_rank=table(m, torch.int32),
            b_col=table(m, torch.int32),
        )

    def load(self, meta: LoraStepMeta) -> None:
        """Copy the step's tables in, unless they are the ones copied last."""
        source = (meta.row_addr, meta.a_row, meta.a_rank, meta.b_row, meta.b_rank, meta.b_col)
        if len(self.source) == len(source) and all(
            a is b for a, b in zip(source, self.source, strict=True)
        ):
            return
        self.row_addr[: meta.row_addr.shape[0]].copy_(meta.row_addr)
        n = meta.num_slots
        for mine, theirs in zip(
            (self.a_row, self.a_rank, self.b_row, self.b_rank, self.b_col), source[1:], strict=True
        ):
            mine[:n].copy_(theirs)
        self.source = source


@dataclass
class StaticInputs:
    """A decode step's per-row inputs at fixed addresses, sized for the largest bucket."""

    input_ids: torch.Tensor  # [B_max] long
    positions: torch.Tensor  # [B_max] long
    slot_rows: torch.Tensor  # [B_max] long
    logits_index: torch.Tensor  # [B_max] long: 0 .. B_max - 1
    block_tables: torch.Tensor  # [B_max, W] int32
    context_lens: torch.Tensor  # [B_max] int32
    cu_seqlens_q: torch.Tensor  # [B_max + 1] int32: 0 .. B_max
    row_slot: torch.Tensor  # [B_max] int32
    seg_start: torch.Tensor  # [B_max + 1] int32 (BGMV reads row_slot; the checks want these)
    seg_slot: torch.Tensor  # [B_max] int32

    @staticmethod
    def empty(max_batch: int, width: int, device: torch.device) -> StaticInputs:
        def zeros(n: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(n, dtype=dtype, device=device)

        return StaticInputs(
            input_ids=zeros(max_batch, torch.long),
            positions=zeros(max_batch, torch.long),
            slot_rows=zeros(max_batch, torch.long),
            logits_index=torch.arange(max_batch, dtype=torch.long, device=device),
            block_tables=torch.zeros(max_batch, width, dtype=torch.int32, device=device),
            context_lens=zeros(max_batch, torch.int32),
            cu_seqlens_q=torch.arange(max_batch + 1, dtype=torch.int32, device=device),
            row_slot=zeros(max_batch, torch.int32),
            seg_start=zeros(max_batch + 1, torch.int32),
            seg_slot=zeros(max_batch, torch.int32),
        )
