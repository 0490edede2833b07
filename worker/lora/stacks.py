"""Slots in stacked adapter weights: where each resident adapter's matrices live.

Adapters whose (layer, fused group) has the same targeted projections and ranks share
one StackedLora of `capacity` slots, allocated on first use. Placing an adapter copies
its weights into a free slot once and makes its FusedLora tensors views of that slot;
removing it frees the slot. Slot ids are plain integers with a free list (lowest
first, so stacks stay compact). A full stack leaves that group unstacked: it still
runs, segment by segment.
"""

from __future__ import annotations

import heapq

import torch

from worker.kernels.lora_ref import ExpandPart, StackedLora
from worker.lora.adapter import LoraAdapter
from worker.model.forward_batch import FusedLora

# (layer, group, Σ r, per part (rank, out_cols start, out_cols stop))
StackKey = tuple[int, str, int, tuple[tuple[int, int, int], ...]]


class AdapterStacks:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.stacks: dict[StackKey, StackedLora] = {}
        self.free: dict[StackKey, list[int]] = {}
        self.used: dict[StackKey, set[int]] = {}

    def place(self, adapter: LoraAdapter) -> None:
        for (layer, group), fused in adapter.groups.items():
            key = _key(layer, group, fused)
            if key not in self.stacks:
                self._create(key, fused)
            if not self.free[key]:
                continue
            slot = heapq.heappop(self.free[key])
            self.used[key].add(slot)
            stack = self.stacks[key]
            stack.high_water = max(self.used[key]) + 1
            _move_into(fused, stack, slot)

    def remove(self, adapter: LoraAdapter) -> None:
        for (layer, group), fused in adapter.groups.items():
            if fused.stack is None:
                continue
            key = _key(layer, group, fused)
            self.used[key].discard(fused.slot)
            heapq.heappush(self.free[key], fused.slot)
            fused.stack.high_water = max(self.used[key], default=-1) + 1
            fused.stack, fused.slot = None, -1

    def _create(self, key: StackKey, fused: FusedLora) -> None:
        a, cap = fused.a, self.capacity
        self.stacks[key] = StackedLora(
            a=torch.empty((cap, *a.shape), dtype=a.dtype, device=a.device),
            b=[torch.empty((cap, *p.b.shape), dtype=a.dtype, device=a.device) for p in fused.parts],
            rank_cols=tuple(p.rank_cols for p in fused.parts),
            out_cols=tuple(p.out_cols for p in fused.parts),
        )
        self.free[key] = list(range(cap))
        self.used[key] = set()


def _key(layer: int, group: str, fused: FusedLora) -> StackKey:
    parts = tuple(
        (p.rank_cols.stop - p.rank_cols.start, p.out_cols.start, p.out_cols.stop)
        for p in fused.parts
    )
    return (layer, group, fused.a.shape[0], parts)


def _move_into(fused: FusedLora, stack: StackedLora, slot: int) -> None:
    """Copy the weights into the slot once; the adapter then reads them there."""
    stack.a[slot].copy_(fused.a)
    parts = []
    for b, part in zip(stack.b, fused.parts, strict=True):
        b[slot].copy_(part.b)
        parts.append(ExpandPart(part.rank_cols, part.out_cols, b[slot]))
    fused.a, fused.parts = stack.a[slot], tuple(parts)
    fused.stack, fused.slot = stack, slot
