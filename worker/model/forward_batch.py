"""Per-step inputs of one forward pass, built once by the runner and passed to every layer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from worker.kernels.lora_gather import GatherBucket
from worker.kernels.lora_meta import LoraStepMeta
from worker.kernels.lora_ref import ExpandPart, Segments


@dataclass(frozen=True)
class AttentionGroup:
    """Sequences whose queries are attended together (decodes; or one prefill chunk)."""

    rows: slice  # token rows [B · Lq] of these queries, contiguous, sequence by sequence
    num_seqs: int  # B; every sequence has Lq = (rows.stop - rows.start) / B queries
    ctx_rows: torch.Tensor  # [B, Lk] long: layer-0 K row of every context position (pad: 0)
    mask: torch.Tensor  # [B, 1, Lq, Lk] bool: causal, window and padding mask


@dataclass(frozen=True)
class PagedAttention:
    """The same batch for varlen kernels: block tables and offsets, no dense masks."""

    block_tables: torch.Tensor  # [B, max_blocks] int32 page ids (padded with 0)
    context_lens: torch.Tensor  # [B] int32: tokens in the cache after this step's writes
    cu_seqlens_q: torch.Tensor  # [B + 1] int32: query rows of each sequence
    max_query_len: int
    decode_only: bool  # every sequence has one query (flash-decoding)
    num_layers: int  # L, to view the pool's KV rows as [pages, L, 2, page_tokens, n_kv, d]
    window: int | None  # sliding window (Mistral), or None


@dataclass
class FusedLora:
    """One adapter on one fused projection group of one layer (scales folded into B)."""

    a: torch.Tensor  # [Σ r_m, in]: the A of each targeted projection, stacked
    parts: tuple[ExpandPart, ...]  # one per targeted projection


class RowLora(Protocol):
    """A kernel for one step's short segments (the CPU's C BGMV, worker/kernels/lora_cpu)."""

    def apply(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        layer: int,
        group: int,
    ) -> None: ...


class LoraWeights(Protocol):
    """One adapter's weights as the CPU path reads them (views of the page pool)."""

    def fused(self, layer: int, group: str) -> FusedLora | None: ...


@dataclass(frozen=True)
class LoraBatch:
    """Token rows grouped into runs that share an adapter (SGMV), both ways the ops read it."""

    segments: Segments  # over the T token rows of the batch
    adapters: Sequence[LoraWeights | None]  # [S] each segment's adapter (None: base, bucketed,
    #                                     or the C kernel's); empty when every one is None
    meta: LoraStepMeta | None  # device tensors for the kernels (None on the CPU path)
    buckets: Sequence[GatherBucket] = ()  # CPU: one-row segments by adapter layout
    table: torch.Tensor | None = None  # CPU: the pool as γ-wide rows (lora_gather)
    out_cols: tuple[tuple[slice, ...], ...] = ()  # per group: each projection's columns
    decode_only: bool = False  # every row is its own segment's only token (BGMV)
    rows_op: RowLora | None = None  # CPU: the short segments in C (instead of buckets)


@dataclass(frozen=True)
class ForwardBatch:
    input_ids: torch.Tensor  # [T] long: the new tokens of every sequence, concatenated
    positions: torch.Tensor  # [T] long: position of each token in its sequence
    slot_rows: torch.Tensor  # [T] long: layer-0 K row each token's K is written to
    kv_layer_rows: int  # rows from one layer's K to the next's (2 · page_tokens)
    kv_v_rows: int  # rows from a K to its V (page_tokens)
    attention: Sequence[AttentionGroup]  # groups covering every token row once (CPU path)
    paged: PagedAttention | None  # the kernels' view of the same attention (GPU path)
    logits_index: torch.Tensor  # [N] long: rows whose next-token logits are wanted
    lora: LoraBatch | None  # None when no sequence in the batch has an adapter
