"""Random adapters laid into a scattered page pool, and their float64 LoRA reference.

The layout follows docs/memory.md: per adapter, a stream of rows (layer-major, groups qkv,
o, gate_up, down; per group the stacked A of its targeted projections, then one B per
targeted projection) laid into pages taken from a shuffled free list. A row runs across a
page boundary only when the next page is the physically adjacent one; otherwise it starts
at the next page. Every element of the pool that no row owns is NaN, so a kernel reading
outside its rows poisons its output.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from worker.kernels.lora_meta import GROUP_PROJECTIONS, LoraStepMeta

RANKS = (1, 2, 3, 8, 16, 64, 256)  # drawn per projection: mixed ranks in one batch
POPULARITY = ("distinct", "uniform", "skewed", "identical", "base_rows")


@dataclass(frozen=True)
class Shapes:
    """A Llama-like model's projection widths, and the page size of its pool."""

    layers: int
    hidden: int
    q_size: int
    kv_size: int
    inter: int
    page_elems: int  # E

    def in_width(self, group: int) -> int:
        return (self.hidden, self.q_size, self.hidden, self.inter)[group]

    def out_widths(self, group: int) -> tuple[int, ...]:
        h, q, kv, i = self.hidden, self.q_size, self.kv_size, self.inter
        return ((q, kv, kv), (h,), (i, i), (h,))[group]

    def out_cols(self, group: int) -> list[tuple[int, int]]:
        """(first column, width) of each projection inside the group's fused output."""
        widths = self.out_widths(group)
        return [(sum(widths[:p]), w) for p, w in enumerate(widths)]

    def out_total(self, group: int) -> int:
        return sum(self.out_widths(group))


SMALL = Shapes(layers=2, hidden=40, q_size=40, kv_size=24, inter=72, page_elems=136)
SMOLLM2 = Shapes(layers=2, hidden=576, q_size=576, kv_size=192, inter=1536, page_elems=12288)


@dataclass
class Adapter:
    """Dense float64 weights (values exactly representable in the pool's dtype)."""

    ranks: dict[tuple[int, int], int]  # (layer, projection) → r (0: not targeted)
    a: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # (l, g) → [Σr, in_g]
    b: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # (l, m) → [r, w_m]


def random_adapter(
    shapes: Shapes, gen: torch.Generator, dtype: torch.dtype, ranks: tuple[int, ...] = RANKS
) -> Adapter:
    """Ranks drawn per projection from `ranks`; about one projection in six untargeted."""
    ad = Adapter(ranks={})
    for layer in range(shapes.layers):
        for g, projections in enumerate(GROUP_PROJECTIONS):
            total = 0
            for p, m in enumerate(projections):
                skip = torch.rand(1, generator=gen).item() < 1 / 6
                r = 0 if skip else ranks[int(torch.randint(len(ranks), (1,), generator=gen))]
                ad.ranks[layer, m] = r
                total += r
                if r:
                    w = shapes.out_widths(g)[p]
                    ad.b[layer, m] = _values((r, w), gen, dtype, 1 / math.sqrt(r))
            if total:
                ad.a[layer, g] = _values((total, shapes.in_width(g)), gen, dtype, 0.3)
    return ad


def _values(
    shape: tuple[int, int], gen: torch.Generator, dtype: torch.dtype, scale: float
) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * scale).to(dtype).double()


def group_ranks(ad: Adapter, layer: int, group: int) -> list[int]:
    return [ad.ranks[layer, m] for m in GROUP_PROJECTIONS[group]]


class _Pages:
    """Lays row after row into pages from a scattered free list (docs/memory.md's rule)."""

    def __init__(self, pool: torch.Tensor, page_elems: int, gen: torch.Generator) -> None:
        self.pool, self.e = pool, page_elems
        num_pages = pool.numel() // page_elems
        runs: list[list[int]] = []
        page = 0
        while page < num_pages:  # runs of 1-3 adjacent pages, shuffled
            n = min(num_pages - page, int(torch.randint(1, 4, (1,), generator=gen)))
            runs.append(list(range(page, page + n)))
            page += n
        order = torch.randperm(len(runs), generator=gen).tolist()
        self.free = [p for i in order for p in runs[i]]
        self.page, self.offset = -1, page_elems  # no page yet: the first row takes one

    def put(self, rows: torch.Tensor) -> list[int]:  # rows [r, width]
        """Write the rows of a matrix one after another; each row's flat offset in the pool."""
        width = rows.shape[1]
        assert width <= self.e, "rows wider than a page are not laid out here"
        addrs = []
        for _ in range(rows.shape[0]):
            if self.offset + width > self.e:
                nxt = self.free.pop(0)
                if nxt == self.page + 1:
                    self.offset -= self.e  # adjacent: the row runs across the boundary
                else:
                    self.offset = 0
                self.page = nxt
            addrs.append(self.page * self.e + self.offset)
            self.offset += width
        index = torch.tensor(addrs)[:, None] + torch.arange(width)[None, :]
        self.pool[index] = rows.to(self.pool.dtype)
        return addrs


def build_meta(
    adapters: list[Adapter],
    shapes: Shapes,
    dtype: torch.dtype,
    device: torch.device,
    gen: torch.Generator,
    row_slot: list[int],
    segments: list[tuple[int, int]],  # (length, slot) per segment
) -> LoraStepMeta:
    """The adapters laid into a NaN-filled pool of scattered pages, and the step's meta."""
    n, num_layers = len(adapters), shapes.layers
    elems = sum(t.numel() for ad in adapters for t in [*ad.a.values(), *ad.b.values()])
    rows = sum(t.shape[0] for ad in adapters for t in [*ad.a.values(), *ad.b.values()])
    num_pages = 2 * (elems + rows * max(shapes.hidden, shapes.inter)) // shapes.page_elems + 4
    pool = torch.full((num_pages * shapes.page_elems,), float("nan"), dtype=dtype)
    pages = _Pages(pool, shapes.page_elems, gen)
    row_addr: list[int] = []
    a_row = torch.full((n, num_layers, 4), -1, dtype=torch.int64)
    a_rank = torch.zeros((n, num_layers, 4), dtype=torch.int32)
    b_row = torch.full((n, num_layers, 7), -1, dtype=torch.int64)
    b_rank = torch.zeros((n, num_layers, 7), dtype=torch.int32)
    b_col = torch.zeros((n, num_layers, 7), dtype=torch.int32)
    for s, ad in enumerate(adapters):
        for layer in range(num_layers):
            for g, projections in enumerate(GROUP_PROJECTIONS):
                if (layer, g) not in ad.a:
                    continue
                a_row[s, layer, g], a_rank[s, layer, g] = len(row_addr), ad.a[layer, g].shape[0]
                row_addr += pages.put(ad.a[layer, g])
                col = 0
                for m in projections:
                    r = ad.ranks[layer, m]
                    if r:
                        b_row[s, layer, m], b_rank[s, layer, m], b_col[s, layer, m] = (
                            len(row_addr),
                            r,
                            col,
                        )
                        row_addr += pages.put(ad.b[layer, m])
                        col += r
    starts = [0]
    for length, _ in segments:
        starts.append(starts[-1] + length)

    def i32(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=device)

    return LoraStepMeta(
        pool=pool.to(device),
        row_addr=torch.tensor(row_addr, dtype=torch.int64, device=device),
        a_row=a_row.to(device),
        a_rank=a_rank.to(device),
        b_row=b_row.to(device),
        b_rank=b_rank.to(device),
        b_col=b_col.to(device),
        seg_start=i32(starts),
        seg_slot=i32([slot for _, slot in segments]),
        row_slot=i32(row_slot),
        max_rank=int(a_rank.max()) if n else 0,
    )


def row_widths(meta: LoraStepMeta, shapes: Shapes) -> torch.Tensor:  # [R] int64
    """The width of every row in the row table, from the adapters' A and B tables."""
    widths = torch.zeros(meta.row_addr.shape[0], dtype=torch.int64)
    for s in range(meta.num_slots):
        for layer in range(shapes.layers):
            for g, projections in enumerate(GROUP_PROJECTIONS):
                first, rank = int(meta.a_row[s, layer, g]), int(meta.a_rank[s, layer, g])
                widths[first : first + rank] = shapes.in_width(g)
                for m, w in zip(projections, shapes.out_widths(g), strict=True):
                    first, rank = int(meta.b_row[s, layer, m]), int(meta.b_rank[s, layer, m])
                    widths[first : first + rank] = w
    return widths


def assign_slots(mode: str, count: int, gen: torch.Generator) -> tuple[list[int], int]:
    """Slots for `count` rows (or segments) under a popularity mode, and how many adapters."""
    if mode == "distinct":
        return list(range(count)), count
    if mode == "uniform":  # groups of 3 share an adapter, interleaved
        n = math.ceil(count / 3)
        return [int(s) % n for s in torch.randperm(count, generator=gen)], n
    if mode == "skewed":  # Zipf-like: a few hot adapters, a long tail
        n = max(1, count)
        weights = torch.tensor([1 / (k + 1) ** 1.5 for k in range(n)])
        return torch.multinomial(weights, count, replacement=True, generator=gen).tolist(), n
    if mode == "identical":
        return [0] * count, 1
    if mode == "base_rows":  # about 40% of rows without an adapter, the rest distinct
        slots = [i if torch.rand(1, generator=gen).item() > 0.4 else -1 for i in range(count)]
        return slots, count
    raise ValueError(f"unknown popularity mode {mode}")


@dataclass
class LoraRef:
    v: torch.Tensor  # [T, max_rank] float64: x A_sᵀ, zero past each row's rank
    delta: torch.Tensor  # [T, out_total] float64: what the expand adds
    v_used: torch.Tensor  # [T, max_rank] bool: columns below each row's a_rank
    touched: torch.Tensor  # [T, out_total] bool: columns of projections the row's slot targets


def lora_f64(
    x: torch.Tensor,  # [T, in_g]
    row_slot: list[int],
    adapters: list[Adapter],
    shapes: Shapes,
    layer: int,
    group: int,
    max_rank: int,
) -> LoraRef:
    """The float64 loop: per row, v = x A_sᵀ, then delta[part of m] = v[ranks of m] B_m."""
    tokens = x.shape[0]
    ref = LoraRef(
        v=torch.zeros(tokens, max_rank, dtype=torch.float64),
        delta=torch.zeros(tokens, shapes.out_total(group), dtype=torch.float64),
        v_used=torch.zeros(tokens, max_rank, dtype=torch.bool),
        touched=torch.zeros(tokens, shapes.out_total(group), dtype=torch.bool),
    )
    for t, s in enumerate(row_slot):
        if s < 0 or (layer, group) not in adapters[s].a:
            continue
        ad = adapters[s]
        vt = x[t].double().cpu() @ ad.a[layer, group].T  # [Σr]
        ref.v[t, : vt.shape[0]] = vt
        ref.v_used[t, : vt.shape[0]] = True
        col = 0
        for m, (first, w) in zip(GROUP_PROJECTIONS[group], shapes.out_cols(group), strict=True):
            r = ad.ranks[layer, m]
            if r:
                ref.delta[t, first : first + w] = vt[col : col + r] @ ad.b[layer, m]
                ref.touched[t, first : first + w] = True
                col += r
    return ref


@dataclass
class LoraCase:
    meta: LoraStepMeta
    adapters: list[Adapter]
    row_slot: list[int]  # [T] the slot of every token row
    shapes: Shapes


@functools.lru_cache(maxsize=8)  # a case serves the four groups' tests; kernels never write it
def lora_case(
    op: str,  # "sgmv": `batch` segments of 1..max_len rows; "bgmv": `batch` rows
    popularity: str,
    batch: int,
    dtype: torch.dtype,
    shapes: Shapes,
    device: torch.device,
    seed: int,
    ranks: tuple[int, ...] = RANKS,
    max_len: int = 7,
) -> LoraCase:
    gen = torch.Generator().manual_seed(seed)
    slots, n = assign_slots(popularity, batch, gen)
    adapters = [random_adapter(shapes, gen, dtype, ranks) for _ in range(n)]
    if op == "sgmv":
        lengths = torch.randint(1, max_len + 1, (batch,), generator=gen).tolist()
        segments = list(zip(lengths, slots, strict=True))
        row_slot = [s for length, s in segments for _ in range(length)]
    else:
        row_slot, segments = slots, [(1, s) for s in slots]
    meta = build_meta(adapters, shapes, dtype, device, gen, row_slot, segments)
    return LoraCase(meta, adapters, row_slot, shapes)
