"""Adapter stacks: slots, growth with re-pointed views, removal."""

from __future__ import annotations

import torch

from worker.kernels.lora_ref import ExpandPart
from worker.lora.adapter import LoraAdapter
from worker.lora.stacks import AdapterStacks
from worker.model.forward_batch import FusedLora


def adapter(name: str, seed: int, rank: int = 4) -> LoraAdapter:
    gen = torch.Generator().manual_seed(seed)
    fused = FusedLora(
        a=torch.randn(rank, 8, generator=gen),
        parts=(ExpandPart(slice(0, rank), slice(0, 6), torch.randn(rank, 6, generator=gen)),),
    )
    return LoraAdapter(name, rank, {(0, "o"): fused}, 0)


def test_stack_grows_keeps_weights_and_frees_slots() -> None:
    stacks = AdapterStacks(max_slots=4, initial_slots=1)
    adapters = [adapter(f"a{i}", i) for i in range(5)]
    originals = [
        (a.groups[(0, "o")].a.clone(), a.groups[(0, "o")].parts[0].b.clone()) for a in adapters
    ]
    for a in adapters:
        stacks.place(a)
    fused = [a.groups[(0, "o")] for a in adapters]
    assert [f.slot for f in fused] == [0, 1, 2, 3, -1]  # the fifth does not fit: unstacked
    stack = fused[0].stack
    assert stack is not None and stack.a.shape[0] == 4 and stack.high_water == 4
    for f, (a, b) in zip(fused, originals, strict=True):
        torch.testing.assert_close(f.a, a)  # views of the grown stack, same values
        torch.testing.assert_close(f.parts[0].b, b)
        if f.stack is not None:
            assert f.a.data_ptr() == stack.a[f.slot].data_ptr()
    stacks.remove(adapters[3])
    assert stack.high_water == 3 and fused[3].stack is None
    stacks.remove(adapters[1])
    assert stack.high_water == 3
    stacks.place(adapter("again", 9))  # takes the lowest free slot
    assert stacks.members[next(iter(stacks.stacks))].keys() == {0, 1, 2}


def test_different_ranks_use_different_stacks() -> None:
    stacks = AdapterStacks(max_slots=8)
    stacks.place(adapter("r4", 0, rank=4))
    stacks.place(adapter("r8", 1, rank=8))
    assert len(stacks.stacks) == 2
