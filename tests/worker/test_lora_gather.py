"""The CPU BGMV (worker/kernels/lora_gather), the op the CPU path runs for decode rows of
distinct adapters, against a float64 loop through real page tables: swept over dtype ×
rank mix × adapter popularity × batch size, with base-model rows in the batch."""

from __future__ import annotations

import pytest
import torch

from tests.worker.memory_helpers import (
    manager_with,
    random_host_adapter,
    tiny_shape,
    wait_on_host,
)
from worker.kernels import lora_gather
from worker.kernels.lora_meta import GROUP_PROJECTIONS, PROJECTIONS
from worker.kernels.lora_ref import Segments
from worker.lora.adapter import HostAdapter, HostLora
from worker.lora.resident import ResidentAdapter
from worker.memory.allocator import PageKind
from worker.memory.geometry import PageGeometry
from worker.memory.pool import MemoryPool
from worker.runner import _buckets

LAYOUTS = (  # target subsets with their rank per module; two layouts → two buckets
    lambda r: {"q_proj": r, "v_proj": r + 2, "down_proj": max(r // 2, 1)},
    lambda r: {"q_proj": r + 1, "up_proj": r},
)
RANKS = {"rank 1": (1,), "ranks 4-16": (4, 8, 16), "ranks 1-64 mixed": (1, 64, 8, 32)}
# Row i's adapter as an index into the batch's adapters (-1: base model). Rows sharing an
# adapter are kept apart: consecutive rows of one adapter form a segment, not a BGMV row.
POPULARITY = {
    "all distinct": lambda n: list(range(n)),
    "two shared by all": lambda n: [i % 2 for i in range(n)],
    "skewed": lambda n: [0 if i % 3 != 2 else 1 + i % 4 for i in range(n)][::-1],
    "base rows between": lambda n: [i // 2 if i % 2 == 0 else -1 for i in range(n)],
}
# (activations and pool, adapter rows) → ‖out − ref‖ / ‖ref‖. The reference reads the rows
# as stored, so bfloat16 rows under float32 activations are held to float32's bound.
DTYPES = {
    "float32": (torch.float32, torch.float32, 1e-5),
    "bfloat16": (torch.bfloat16, torch.bfloat16, 2e-2),
    "bfloat16 rows, float32 model": (torch.float32, torch.bfloat16, 1e-5),
}


def narrowed(adapter: HostAdapter, dtype: torch.dtype) -> HostAdapter:
    """The adapter as the host cache holds it for a pool whose rows are `dtype`."""
    modules = {k: HostLora(m.a.to(dtype), m.b.to(dtype)) for k, m in adapter.modules.items()}
    return HostAdapter(adapter.adapter_id, modules, adapter.nbytes)


def pool_of(
    dtype: torch.dtype, num_pages: int, lora_dtype: torch.dtype | None = None
) -> MemoryPool:
    geometry = PageGeometry(2, 4, 2, 4, itemsize=torch.finfo(dtype).bits // 8)
    pool = MemoryPool(geometry, num_pages, dtype, torch.device("cpu"), lora_dtype)
    for page in range(0, num_pages, 3):  # scattered: no long runs, rows straddle boundaries
        pool.allocator._free.remove(page)
        pool.allocator._kind[page], pool.allocator._owner[page] = PageKind.KV, "kv"
    return pool


def separate(slots: list[int]) -> list[int]:
    """The same multiset of slots with no two neighbours equal (a base row, -1, between)."""
    out: list[int] = []
    for slot in slots:
        if out and slot == out[-1] and slot >= 0:
            out.append(-1)
        out.append(slot)
    return out


@pytest.mark.parametrize("dtypes", list(DTYPES))
@pytest.mark.parametrize("ranks", list(RANKS))
@pytest.mark.parametrize("popularity", list(POPULARITY))
@pytest.mark.parametrize("batch", [1, 5, 16])
def test_gathered_products_match_float64(
    dtypes: str, ranks: str, popularity: str, batch: int
) -> None:
    shape = tiny_shape()
    dtype, rows_dtype, tolerance = DTYPES[dtypes]
    slots = separate(POPULARITY[popularity](batch))
    names = sorted({f"a{s}" for s in slots if s >= 0})
    hosts = {
        name: narrowed(
            random_host_adapter(
                name, LAYOUTS[i % 2](RANKS[ranks][i % len(RANKS[ranks])]), shape, seed=i
            ),
            rows_dtype,
        )
        for i, name in enumerate(names)
    }
    pool = pool_of(dtype, 6000, rows_dtype)
    manager = manager_with(pool, shape, hosts)
    resident: dict[str, ResidentAdapter | None] = {}
    for name in hosts:
        wait_on_host(manager, name)
        resident[name] = manager.make_resident(name)
    row_names = [f"a{s}" if s >= 0 else None for s in slots]
    segments = Segments.from_rows([names.index(n) if n else -1 for n in row_names])
    adapters = [resident[n] if n else None for n in row_names]
    buckets = _buckets(segments, adapters, torch.device("cpu"))
    assert sum(len(b.rows) for b in buckets) == sum(n is not None for n in row_names)
    gen = torch.Generator().manual_seed(batch)
    table = pool.lora.view(-1, shape.granule)
    for layer in range(shape.num_layers):
        for g, projections in enumerate(GROUP_PROJECTIONS):
            x = torch.randn(len(slots), shape.in_widths[g], generator=gen).to(dtype)
            y = torch.randn(len(slots), shape.out_cols[g][-1].stop, generator=gen).to(dtype)
            want = y.double().clone()
            for row, name in enumerate(row_names):
                for p, cols in zip(projections, shape.out_cols[g], strict=True):
                    lora = hosts[name].modules.get((layer, PROJECTIONS[p])) if name else None
                    if lora is not None:
                        want[row, cols] += x[row].double() @ lora.a.double().t() @ lora.b.double()
            for bucket in buckets:
                lora_gather.apply(table, x, y, bucket, layer, g, projections, shape.out_cols[g])
            error = (y.double() - want).norm() / want.norm()
            assert error <= tolerance, f"layer {layer} group {g}: {error:.2e}"
            base = [row for row, name in enumerate(row_names) if name is None]
            assert torch.equal(y[base].double(), want[base])  # base rows untouched
