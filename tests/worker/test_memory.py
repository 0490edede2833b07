"""The page pool's bookkeeping under random traffic, and adapter rows placed in its pages.

Property tests with a seeded generator (repeatable): random sequences of KV and adapter
allocations, frees, pins and evictions, checked after every operation — no page owned
twice, every page's kind and owner agree with its holder, counts add up — and adapter
rows that land where the row table says, readable through views and through gathers.
"""

from __future__ import annotations

import random

import pytest
import torch

from tests.worker.memory_helpers import (
    manager_with,
    random_host_adapter,
    tiny_pool,
    tiny_shape,
    wait_on_host,
)
from worker.kernels.lora_meta import GROUPS, PROJECTIONS
from worker.lora import manager as manager_module
from worker.lora.adapter import HostAdapter, HostLora
from worker.lora.layout import DoesNotFit, matrix_specs, place_rows, total_elems
from worker.memory.allocator import OutOfPages, PageAllocator, PageKind


def check_invariants(alloc: PageAllocator, held: dict[str, tuple[PageKind, list[int]]]) -> None:
    owned = [p for _, pages in held.values() for p in pages]
    assert len(owned) == len(set(owned)), "a page is owned twice"
    counts = alloc.counts()
    assert counts.free + counts.kv + counts.adapter == counts.total
    assert counts.free == alloc.num_free == alloc.num_pages - len(owned)
    for owner, (kind, pages) in held.items():
        for page in pages:
            assert alloc.kind(page) is kind and alloc.owner(page) == owner
    free = {p for p in range(alloc.num_pages) if alloc.kind(p) is PageKind.FREE}
    assert free.isdisjoint(owned) and len(free) == counts.free


@pytest.mark.parametrize("seed", range(12))
def test_random_allocate_free_pin_keeps_the_books(seed: int) -> None:
    rng = random.Random(seed)
    alloc = PageAllocator(rng.randint(8, 96))
    held: dict[str, tuple[PageKind, list[int]]] = {}
    pinned: dict[str, int] = {}
    for step in range(400):
        op = rng.random()
        owner = f"o{step}"
        count = rng.randint(0, 12)
        if op < 0.45:
            kind = PageKind.KV if rng.random() < 0.5 else PageKind.ADAPTER
            take = alloc.allocate_kv if kind is PageKind.KV else alloc.allocate_adapter
            before = alloc.num_free
            try:
                held[owner] = (kind, take(count, owner))
            except OutOfPages:
                assert count > before and alloc.num_free == before  # all or nothing
        elif op < 0.75 and held:
            victim = rng.choice(sorted(held))
            if pinned.get(victim):
                with pytest.raises(ValueError, match="pinned"):
                    alloc.free(held[victim][1][:1])
                continue
            alloc.free(held.pop(victim)[1])
        elif op < 0.9 and any(pages for _, pages in held.values()):
            target = rng.choice(sorted(o for o, (_, pages) in held.items() if pages))
            alloc.pin(held[target][1])
            pinned[target] = pinned.get(target, 0) + 1
        elif pinned:
            target = rng.choice(sorted(pinned))
            alloc.unpin(held[target][1])
            pinned[target] -= 1
            if pinned[target] == 0:
                del pinned[target]
        check_invariants(alloc, held)
    assert alloc.counts().pinned == sum(len(held[o][1]) for o in pinned)
    with pytest.raises(ValueError, match="no such pages"):
        alloc.free([-1])


def test_adapters_get_the_lowest_contiguous_run_and_kv_the_top() -> None:
    alloc = PageAllocator(10)
    kv = alloc.allocate_kv(2, "seq")
    assert kv == [9, 8]
    a = alloc.allocate_adapter(3, "a")
    b = alloc.allocate_adapter(2, "b")
    assert a == [0, 1, 2] and b == [3, 4]
    alloc.free(a)
    alloc.allocate_kv(1, "seq2")  # takes 7, leaving runs [0, 3) and [5, 7)
    assert alloc.allocate_adapter(2, "c") == [0, 1]  # first fit
    assert alloc.allocate_adapter(3, "d") == [2, 5, 6]  # no run of 3: lowest pages
    assert alloc.counts().largest_free_run == 0


@pytest.mark.parametrize("seed", range(6))
def test_rows_never_overlap_and_cross_only_into_adjacent_pages(seed: int) -> None:
    rng = random.Random(seed)
    shape = tiny_shape()
    page_elems = 2 * 2 * 4 * 8  # tiny_pool geometry: 128 elements
    ranks = {
        (layer, p): rng.randint(1, 9)
        for layer in range(shape.num_layers)
        for p in range(len(PROJECTIONS))
        if rng.random() < 0.7
    }
    specs = matrix_specs(ranks, shape.in_widths, shape.out_widths, shape.num_layers)
    pages = sorted(rng.sample(range(200), k=total_elems(specs) // page_elems + 8))
    addresses = place_rows(specs, pages, page_elems)
    widths = [s.width for s in specs for _ in range(s.rows)]
    spans = sorted(zip(addresses, widths, strict=True))
    for (a0, w0), (a1, _) in zip(spans, spans[1:], strict=False):
        assert a0 + w0 <= a1, "rows overlap"
    allowed = set(pages)
    for address, width in spans:
        first, last = address // page_elems, (address + width - 1) // page_elems
        assert first in allowed and last in allowed
        assert last - first <= 1  # a row spans at most two pages, and only adjacent ones
    with pytest.raises(DoesNotFit):
        place_rows(specs, pages[: len(pages) // 4], page_elems)


def test_a_row_placed_off_the_granule_is_refused_at_page_in(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shape = tiny_shape()
    assert shape.granule == 8
    pool = tiny_pool(64)
    manager = manager_with(pool, shape, {"a": random_host_adapter("a", {"q_proj": 3}, shape, 1)})
    wait_on_host(manager, "a")
    placed = manager_module.place_rows
    monkeypatch.setattr(  # every row one element further on: inside its pages, off γ
        manager_module, "place_rows", lambda *args: [a + 1 for a in placed(*args)]
    )
    with pytest.raises(ValueError, match="not a multiple of γ=8"):
        manager.make_resident("a")


def test_paged_in_weights_read_back_through_views_and_gathers() -> None:
    shape = tiny_shape()
    ranks = {"q_proj": 3, "v_proj": 5, "o_proj": 2, "gate_proj": 4, "down_proj": 6}
    host = random_host_adapter("a", ranks, shape, seed=1)
    pool = tiny_pool(64)
    pool.allocator.allocate_adapter(1, "blocker")  # page 0 taken...
    pool.allocator.allocate_kv(40, "kv")  # ...and the top: adapters land in [1, 24)
    manager = manager_with(pool, shape, {"a": host})
    wait_on_host(manager, "a")
    resident = manager.make_resident("a")
    for layer in range(shape.num_layers):
        for g, group in enumerate(GROUPS):
            fused = resident.fused(layer, group)
            names = [PROJECTIONS[p] for p in ((0, 1, 2), (3,), (4, 5), (6,))[g]]
            targeted = [n for n in names if n in ranks]
            if not targeted:
                assert fused is None
                continue
            assert fused is not None
            want_a = torch.cat([host.modules[(layer, n)].a for n in targeted])
            torch.testing.assert_close(fused.a, want_a, rtol=0, atol=0)
            for part, name in zip(fused.parts, targeted, strict=True):
                torch.testing.assert_close(part.b, host.modules[(layer, name)].b, rtol=0, atol=0)
    # Row table: every row read straight from the flat pool equals the host row.
    first_a = int(resident.a_row[0, 0])
    row0 = pool.flat[int(resident.rows[first_a]) :][: shape.in_widths[0]]
    torch.testing.assert_close(row0, host.modules[(0, "q_proj")].a[0], rtol=0, atol=0)


@pytest.mark.parametrize("scattered", [False, True], ids=["one run", "scattered pages"])
def test_bfloat16_rows_in_a_float32_pool(scattered: bool) -> None:
    """lora_dtype=bfloat16: two adapter elements per pool element, so an adapter takes half
    the pages; its rows read back exactly (the host copy is already bfloat16), and the KV
    pages around them keep every bit."""
    shape = tiny_shape()
    ranks = {"q_proj": 7, "v_proj": 3, "gate_proj": 5, "down_proj": 9}
    wide = random_host_adapter("a", ranks, shape, seed=3)
    narrow = HostAdapter(
        "a",
        {k: HostLora(m.a.bfloat16(), m.b.bfloat16()) for k, m in wide.modules.items()},
        wide.nbytes // 2,
    )
    pages_f32 = manager_with(tiny_pool(64), shape, {"a": wide})
    wait_on_host(pages_f32, "a")
    pool = tiny_pool(64, lora_dtype=torch.bfloat16)
    assert pool.lora.numel() == 2 * pool.flat.numel() and pool.lora.dtype == torch.bfloat16
    kv_pages = list(range(0, 64, 2)) if scattered else list(range(40, 64))
    for page in kv_pages:
        pool.allocator._free.remove(page)
        pool.allocator._kind[page], pool.allocator._owner[page] = PageKind.KV, "kv"
    pool.buffer[kv_pages] = torch.randn(len(kv_pages), pool.geometry.page_elems)
    kv_before = pool.buffer[kv_pages].clone()
    manager = manager_with(pool, shape, {"a": narrow})
    wait_on_host(manager, "a")
    assert manager.pages_needed("a") == -(-pages_f32.pages_needed("a") // 2)  # ⌈n / 2⌉
    resident = manager.make_resident("a")
    assert torch.equal(pool.buffer[kv_pages], kv_before)
    for layer in range(shape.num_layers):
        fused = resident.fused(layer, "qkv")
        assert fused is not None and fused.a.dtype == torch.bfloat16
        want = torch.cat([narrow.modules[(layer, m)].a for m in ("q_proj", "v_proj")])
        assert torch.equal(fused.a, want)
        down = resident.fused(layer, "down")
        assert down is not None
        assert torch.equal(down.parts[0].b, narrow.modules[(layer, "down_proj")].b)
    first = int(resident.rows[int(resident.b_row[1, PROJECTIONS.index("v_proj")])])
    row = pool.lora[first : first + shape.out_widths[PROJECTIONS.index("v_proj")]]
    assert torch.equal(row, narrow.modules[(1, "v_proj")].b[0])


def test_scattered_pages_are_gathered_correctly() -> None:
    shape = tiny_shape()
    host = random_host_adapter("a", {"q_proj": 7, "down_proj": 9}, shape, seed=2)
    pool = tiny_pool(64)
    for page in range(0, 64, 2):  # every other page taken: no run longer than one page
        pool.allocator._free.remove(page)
        pool.allocator._kind[page] = PageKind.KV
        pool.allocator._owner[page] = "kv"
    manager = manager_with(pool, shape, {"a": host})
    wait_on_host(manager, "a")
    resident = manager.make_resident("a")
    assert all(b - a >= 2 for a, b in zip(resident.pages, resident.pages[1:], strict=False))
    assert any(p.view is None for p in resident.placed.values()), "some rows must straddle"
    for layer in range(shape.num_layers):
        fused = resident.fused(layer, "qkv")
        assert fused is not None
        torch.testing.assert_close(fused.a, host.modules[(layer, "q_proj")].a, rtol=0, atol=0)
        down = resident.fused(layer, "down")
        assert down is not None
        torch.testing.assert_close(
            down.parts[0].b, host.modules[(layer, "down_proj")].b, rtol=0, atol=0
        )


def test_eviction_frees_the_pages_and_padding_is_counted() -> None:
    shape = tiny_shape()
    adapters = {
        f"a{i}": random_host_adapter(f"a{i}", {"q_proj": 2 + i, "up_proj": 3}, shape, seed=i)
        for i in range(4)
    }
    pool = tiny_pool(40)
    manager = manager_with(pool, shape, adapters)
    for name in adapters:
        wait_on_host(manager, name)
        manager.make_resident(name)
    held, weights = manager.padding_elems()
    assert held >= weights > 0
    assert held - weights < pool.geometry.page_elems * len(adapters)  # < one page each
    free_before = pool.allocator.num_free
    assert manager.evictable({"a0", "a2"}) == ["a1", "a3"]  # LRU order, pinned excluded
    freed = manager.evict("a1")
    assert pool.allocator.num_free == free_before + freed
    assert manager.stats.evictions == 1 and "a1" not in manager.resident


@pytest.mark.parametrize("seed", range(4))
def test_one_run_of_pages_places_rows_as_the_page_walk_does(seed: int) -> None:
    """place_rows' shortcut for adjacent pages (rows back to back) against its page walk,
    forced by a far page appended to the run (the rows fit before it, so it stays empty)."""
    rng = random.Random(seed)
    shape = tiny_shape()
    page_elems = 128
    ranks = {(layer, p): rng.randint(1, 9) for layer in range(2) for p in range(7)}
    specs = matrix_specs(ranks, shape.in_widths, shape.out_widths, shape.num_layers)
    first = rng.randint(0, 50)
    run = list(range(first, first + -(-total_elems(specs) // page_elems)))
    shortcut = place_rows(specs, run, page_elems)
    assert shortcut == place_rows(specs, [*run, run[-1] + 10], page_elems)
    assert shortcut[0] == first * page_elems
    with pytest.raises(DoesNotFit):
        place_rows(specs, run[:-1], page_elems)
