"""Per-step inputs of one forward pass, built by the runner and passed to every layer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from worker.kernels.lora_ref import ExpandPart, Segments, StackedLora


@dataclass(frozen=True)
class AttentionGroup:
    """Sequences whose queries are attended together (decodes; or one prefill chunk)."""

    rows: slice  # token rows [B · Lq] of these queries, contiguous, sequence by sequence
    num_seqs: int  # B; every sequence has Lq = (rows.stop - rows.start) / B queries
    ctx_slots: torch.Tensor  # [B, Lk] long: KV slot of every context position (padded)
    mask: torch.Tensor  # [B, 1, Lq, Lk] bool: causal and padding mask


@dataclass
class FusedLora:
    """One adapter on one fused projection group of one layer (scales folded into B)."""

    a: torch.Tensor  # [Σ r_m, in]: the A of each targeted projection, stacked
    parts: tuple[ExpandPart, ...]  # one per targeted projection
    stack: StackedLora | None = None  # the stack whose slot holds these weights, if any
    slot: int = -1


class LoraWeights(Protocol):
    """One adapter's weights as the model reads them (see worker.lora.adapter)."""

    def fused(self, layer: int, group: str) -> FusedLora | None: ...


@dataclass(frozen=True)
class LoraBatch:
    """SGMV segment data: token rows grouped into runs that share an adapter."""

    segments: Segments  # over the T token rows of the batch
    adapters: Sequence[LoraWeights | None]  # [S] the adapter of each segment (None: base)


@dataclass(frozen=True)
class ForwardBatch:
    input_ids: torch.Tensor  # [T] long: the new tokens of every sequence, concatenated
    positions: torch.Tensor  # [T] long: position of each token in its sequence
    slot_mapping: torch.Tensor  # [T] long: KV slot each token's K/V is written to
    attention: Sequence[AttentionGroup]  # groups covering every token row once
    logits_index: torch.Tensor  # [N] long: rows whose next-token logits are wanted
    lora: LoraBatch | None  # None when no sequence in the batch has an adapter
