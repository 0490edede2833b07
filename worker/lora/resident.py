"""An adapter resident in device pages: its page list, row table, and views for the CPU path.

Paging in copies the host tier's weights row by row into the adapter's pages (one copy
per matrix when its rows are contiguous). The row table and the per-(layer, group,
projection) indices are built once here, on the device; the runner stacks them per
step into a LoraStepMeta. Matrices whose rows are contiguous in the pool are plain
views (the CPU path multiplies them in place); others are gathered when read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from worker.kernels.lora_meta import GROUP_PROJECTIONS, GROUPS, PROJECTIONS
from worker.kernels.lora_ref import ExpandPart
from worker.lora.adapter import HostAdapter
from worker.lora.layout import MatrixSpec
from worker.memory.pool import MemoryPool
from worker.model.config import FUSED_GROUPS, ModelConfig
from worker.model.forward_batch import FusedLora


@dataclass(frozen=True)
class ModelShape:
    """The widths adapter rows have on this model."""

    num_layers: int
    in_widths: tuple[int, ...]  # per group (qkv, o, gate_up, down)
    out_widths: tuple[int, ...]  # per projection (q, k, v, o, gate, up, down)
    out_cols: tuple[tuple[slice, ...], ...]  # per group: each projection's fused columns
    granule: int = 1  # γ: gcd of every width; every row starts at a multiple of it


def model_shape(c: ModelConfig) -> ModelShape:
    """The adapter row widths of a model with config `c`."""
    shapes = c.projection_shapes()
    widths = (c.hidden_size, c.q_size, c.kv_size, c.intermediate_size)
    return ModelShape(
        num_layers=c.num_layers,
        in_widths=(c.hidden_size, c.q_size, c.hidden_size, c.intermediate_size),
        out_widths=tuple(shapes[m][1] for m in shapes),
        out_cols=tuple(tuple(c.fused_columns(g).values()) for g in FUSED_GROUPS),
        granule=math.gcd(*widths),  # divides every row width, and the page (a multiple of kv)
    )


@dataclass(frozen=True)
class GatherTables:
    """An adapter's rows as γ-wide table rows, per group (A) and projection (B), all layers.

    index[k] holds, layer after layer, the table rows of that layer's matrix (K_l of them,
    rows · width / γ); offsets[k][l] is where layer l's start (offsets[k][L] the end).
    """

    signature: tuple[tuple[int, ...], ...]  # the layout: adapters that share it bucket together
    a_index: tuple[torch.Tensor | None, ...]  # per group [Σ_l K_l] long
    a_offsets: tuple[tuple[int, ...], ...]
    a_rank: tuple[tuple[int, ...], ...]  # per group, per layer
    b_index: tuple[torch.Tensor | None, ...]  # per projection [Σ_l K_l] long
    b_offsets: tuple[tuple[int, ...], ...]
    b_rank: tuple[tuple[int, ...], ...]
    b_col: tuple[tuple[int, ...], ...]


@dataclass
class Placed:
    """One matrix in the pool: its spec, its first row in the row table, and its tensor."""

    spec: MatrixSpec
    first_row: int
    view: torch.Tensor | None  # [rows, width] view of the pool; None when rows are scattered


@dataclass
class ResidentAdapter:
    adapter_id: str
    pages: list[int]
    rows: torch.Tensor  # [R] int64 offsets in pool.lora of every row (device)
    a_row: torch.Tensor  # [L, G] int64: first A row of each group (-1: none), into `rows`
    a_rank: torch.Tensor  # [L, G] int32
    b_row: torch.Tensor  # [L, M] int64
    b_rank: torch.Tensor  # [L, M] int32
    b_col: torch.Tensor  # [L, M] int32
    weight_elems: int  # elements of weights (the pages hold page_elems · len(pages))
    max_group_rank: int  # the largest Σ r over one group's projections (shrink output width)
    placed: dict[tuple[int, int, int], Placed] = field(default_factory=dict)  # (l, g, proj)
    shape: ModelShape | None = None
    pool: MemoryPool | None = None
    _fused: dict[tuple[int, str], FusedLora | None] = field(default_factory=dict, repr=False)
    _gather: GatherTables | None = field(default=None, repr=False)

    def gather(self) -> GatherTables | None:
        """The table rows of the torch gathers (worker/kernels/lora_gather), the CPU path
        without its C kernel; built on first use (None off the CPU)."""
        if self._gather is None and self.rows.device.type == "cpu":
            assert self.shape is not None
            specs = [p.spec for p in sorted(self.placed.values(), key=lambda p: p.first_row)]
            addresses = self.rows.tolist()
            self._gather = gather_tables(specs, addresses, self.shape, self.rows.device)
        return self._gather

    def fused(self, layer: int, group: str) -> FusedLora | None:
        """The group's weights for the CPU path: A [Σr, in] and each B [r_m, out_m].

        Built once when every matrix is a view of the pool (the usual case); matrices
        whose rows straddle scattered pages are gathered on every call.
        """
        key = (layer, group)
        if key in self._fused:
            return self._fused[key]
        g = GROUPS.index(group)
        a = self.placed.get((layer, g, -1))
        if a is None or self.shape is None:
            self._fused[key] = None
            return None
        parts, views = [], a.view is not None
        for p, cols in zip(GROUP_PROJECTIONS[g], self.shape.out_cols[g], strict=True):
            b = self.placed.get((layer, g, p))
            if b is not None:
                rank_cols = slice(b.spec.rank_col, b.spec.rank_col + b.spec.rows)
                parts.append(ExpandPart(rank_cols, cols, self._tensor(b)))
                views = views and b.view is not None
        fused = FusedLora(self._tensor(a), tuple(parts))
        if views:
            self._fused[key] = fused
        return fused

    def _tensor(self, placed: Placed) -> torch.Tensor:
        if placed.view is not None:
            return placed.view
        assert self.pool is not None
        width = placed.spec.width
        rows = self.rows[placed.first_row : placed.first_row + placed.spec.rows]
        index = rows[:, None] + torch.arange(width, device=rows.device)[None, :]
        return self.pool.lora[index]  # gathered: this matrix's rows straddle scattered pages


def page_in(
    adapter: HostAdapter,
    specs: list[MatrixSpec],
    addresses: list[int],
    pages: list[int],
    pool: MemoryPool,
    shape: ModelShape,
) -> ResidentAdapter:
    """Copy the host weights into the pool at `addresses`; build the device-side tables."""
    # The kernels promise the GPU that every row starts at a multiple of their row_align,
    # which divides γ (runner.py); a row off γ would be a misaligned vector load there
    # (undefined) and go unnoticed in the interpreter: refuse it here, once per page-in.
    if misaligned := next((a for a in addresses if a % shape.granule), None):
        raise ValueError(
            f"adapter row at element {misaligned} is not a multiple of γ={shape.granule}"
        )
    device = pool.device
    layers, groups, projs = shape.num_layers, len(GROUPS), len(PROJECTIONS)
    a_row = torch.full((layers, groups), -1, dtype=torch.int64)
    a_rank = torch.zeros((layers, groups), dtype=torch.int32)
    b_row = torch.full((layers, projs), -1, dtype=torch.int64)
    b_rank = torch.zeros((layers, projs), dtype=torch.int32)
    b_col = torch.zeros((layers, projs), dtype=torch.int32)
    placed: dict[tuple[int, int, int], Placed] = {}
    first = 0
    for spec in specs:
        host = _host_matrix(adapter, spec)
        view = _write(pool, host, addresses[first : first + spec.rows], spec.width)
        placed[(spec.layer, spec.group, spec.proj)] = Placed(spec, first, view)
        if spec.proj < 0:
            a_row[spec.layer, spec.group], a_rank[spec.layer, spec.group] = first, spec.rows
        else:
            b_row[spec.layer, spec.proj], b_rank[spec.layer, spec.proj] = first, spec.rows
            b_col[spec.layer, spec.proj] = spec.rank_col
        first += spec.rows
    return ResidentAdapter(
        adapter_id=adapter.adapter_id,
        pages=pages,
        rows=torch.tensor(addresses, dtype=torch.int64, device=device),
        a_row=a_row.to(device),
        a_rank=a_rank.to(device),
        b_row=b_row.to(device),
        b_rank=b_rank.to(device),
        b_col=b_col.to(device),
        weight_elems=sum(s.rows * s.width for s in specs),
        max_group_rank=max(s.rows for s in specs if s.proj < 0),
        placed=placed,
        shape=shape,
        pool=pool,
    )


def _host_matrix(adapter: HostAdapter, spec: MatrixSpec) -> torch.Tensor:
    """[rows, width] on the host: the group's stacked A, or one projection's scaled Bᵀ."""
    if spec.proj >= 0:
        return adapter.modules[(spec.layer, PROJECTIONS[spec.proj])].b
    parts = [
        adapter.modules[(spec.layer, PROJECTIONS[p])].a
        for p in GROUP_PROJECTIONS[spec.group]
        if (spec.layer, PROJECTIONS[p]) in adapter.modules
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _write(
    pool: MemoryPool, host: torch.Tensor, addresses: list[int], width: int
) -> torch.Tensor | None:
    """Copy host [rows, width] to its rows; the pool view when the rows are contiguous."""
    rows = len(addresses)
    start = addresses[0]
    if addresses == list(range(start, start + rows * width, width)):
        view = pool.lora[start : start + rows * width].view(rows, width)
        view.copy_(host, non_blocking=True)
        return view
    # Scattered rows: one indexed copy of γ-wide chunks (every row starts at a multiple of
    # the granule γ, which divides its width), not a copy per row.
    granule = math.gcd(width, *addresses)
    chunks = width // granule
    first = torch.tensor(addresses, dtype=torch.long) // granule
    index = (first[:, None] + torch.arange(chunks)[None, :]).reshape(-1)
    table = pool.lora[: pool.lora.numel() // granule * granule].view(-1, granule)
    table.index_copy_(
        0, index.to(pool.device), host.reshape(-1, granule).to(pool.device, table.dtype)
    )
    return None


def gather_tables(
    specs: list[MatrixSpec], addresses: list[int], shape: ModelShape, device: torch.device
) -> GatherTables:
    """Every matrix's table rows (row address / γ + chunk): an A's row by row, a B's chunk
    by chunk (worker/kernels/lora_gather.py says why)."""
    granule, layers = shape.granule, shape.num_layers
    a_parts: list[list[list[int]]] = [[[] for _ in range(layers)] for _ in GROUPS]
    b_parts: list[list[list[int]]] = [[[] for _ in range(layers)] for _ in PROJECTIONS]
    a_rank = [[0] * layers for _ in GROUPS]
    b_rank = [[0] * layers for _ in PROJECTIONS]
    b_col = [[0] * layers for _ in PROJECTIONS]
    first = 0
    for spec in specs:
        chunks = spec.width // granule
        rows = addresses[first : first + spec.rows]
        if spec.proj < 0:  # A: row-major (row j's chunks together), for a gather + bmm
            flat = [a // granule + c for a in rows for c in range(chunks)]
            a_parts[spec.group][spec.layer], a_rank[spec.group][spec.layer] = flat, spec.rows
        else:  # B: chunk-major (chunk c of every row together), one embedding_bag bag each
            flat = [a // granule + c for c in range(chunks) for a in rows]
            b_parts[spec.proj][spec.layer], b_rank[spec.proj][spec.layer] = flat, spec.rows
            b_col[spec.proj][spec.layer] = spec.rank_col
        first += spec.rows
    a_index, a_offsets = _concat(a_parts, device)
    b_index, b_offsets = _concat(b_parts, device)
    return GatherTables(
        signature=tuple((s.layer, s.group, s.proj, s.rows, s.rank_col) for s in specs),
        a_index=a_index,
        a_offsets=a_offsets,
        a_rank=tuple(map(tuple, a_rank)),
        b_index=b_index,
        b_offsets=b_offsets,
        b_rank=tuple(map(tuple, b_rank)),
        b_col=tuple(map(tuple, b_col)),
    )


def _concat(
    parts: list[list[list[int]]], device: torch.device
) -> tuple[tuple[torch.Tensor | None, ...], tuple[tuple[int, ...], ...]]:
    """Per key: the layers' table rows in one tensor, and where each layer starts."""
    indices: list[torch.Tensor | None] = []
    offsets: list[tuple[int, ...]] = []
    for per_layer in parts:
        starts = [0]
        for rows in per_layer:
            starts.append(starts[-1] + len(rows))
        flat = [r for rows in per_layer for r in rows]
        indices.append(torch.tensor(flat, dtype=torch.long, device=device) if flat else None)
        offsets.append(tuple(starts))
    return tuple(indices), tuple(offsets)
