"""Slots in stacked adapter weights: where each resident adapter's matrices live.

Adapters whose (layer, fused group) has the same targeted projections and ranks share
one StackedLora. Placing an adapter copies its weights into a free slot once and makes
its FusedLora tensors views of that slot; removing it frees the slot. Slot ids are
plain integers with a free list (lowest first, so stacks stay compact). A stack starts
with a few slots and doubles when full (re-pointing its members' views), up to
`max_slots`; a full stack leaves that group unstacked: it still runs, segment by
segment.
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
    def __init__(self, max_slots: int, initial_slots: int = 4) -> None:
        self.max_slots = max_slots
        self.initial_slots = max(1, min(initial_slots, max_slots))
        self.stacks: dict[StackKey, StackedLora] = {}
        self.free: dict[StackKey, list[int]] = {}
        self.members: dict[StackKey, dict[int, FusedLora]] = {}

    def place(self, adapter: LoraAdapter) -> None:
        for (layer, group), fused in adapter.groups.items():
            key = _key(layer, group, fused)
            if key not in self.stacks:
                self._create(key, fused)
            if not self.free[key]:
                self._grow(key)
            if not self.free[key]:
                continue
            slot = heapq.heappop(self.free[key])
            self.members[key][slot] = fused
            self._update_high_water(key)
            _move_into(fused, self.stacks[key], slot)

    def remove(self, adapter: LoraAdapter) -> None:
        for (layer, group), fused in adapter.groups.items():
            if fused.stack is None:
                continue
            key = _key(layer, group, fused)
            del self.members[key][fused.slot]
            heapq.heappush(self.free[key], fused.slot)
            self._update_high_water(key)
            fused.stack, fused.slot = None, -1

    def _update_high_water(self, key: StackKey) -> None:
        self.stacks[key].high_water = max(self.members[key], default=-1) + 1

    def _create(self, key: StackKey, fused: FusedLora) -> None:
        a, cap = fused.a, self.initial_slots
        self.stacks[key] = StackedLora(
            a=a.new_empty((cap, *a.shape)),
            b=[a.new_empty((cap, *p.b.shape)) for p in fused.parts],
            rank_cols=tuple(p.rank_cols for p in fused.parts),
            out_cols=tuple(p.out_cols for p in fused.parts),
        )
        self.free[key] = list(range(cap))
        self.members[key] = {}

    def _grow(self, key: StackKey) -> None:
        """Double the stack's slots (up to max_slots); members now read the new tensors."""
        stack = self.stacks[key]
        old = stack.a.shape[0]
        new = min(2 * old, self.max_slots)
        if new <= old:
            return
        stack.a = torch.cat([stack.a, stack.a.new_empty((new - old, *stack.a.shape[1:]))])
        stack.b = [torch.cat([b, b.new_empty((new - old, *b.shape[1:]))]) for b in stack.b]
        for slot, fused in self.members[key].items():
            _point_at(fused, stack, slot)
        for slot in range(old, new):
            heapq.heappush(self.free[key], slot)


def _key(layer: int, group: str, fused: FusedLora) -> StackKey:
    parts = tuple(
        (p.rank_cols.stop - p.rank_cols.start, p.out_cols.start, p.out_cols.stop)
        for p in fused.parts
    )
    return (layer, group, fused.a.shape[0], parts)


def _move_into(fused: FusedLora, stack: StackedLora, slot: int) -> None:
    """Copy the weights into the slot once; the adapter then reads them there."""
    stack.a[slot].copy_(fused.a)
    for b, part in zip(stack.b, fused.parts, strict=True):
        b[slot].copy_(part.b)
    _point_at(fused, stack, slot)


def _point_at(fused: FusedLora, stack: StackedLora, slot: int) -> None:
    parts = (
        ExpandPart(part.rank_cols, part.out_cols, b[slot])
        for b, part in zip(stack.b, fused.parts, strict=True)
    )
    fused.a, fused.parts = stack.a[slot], tuple(parts)
    fused.stack, fused.slot = stack, slot
