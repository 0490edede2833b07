"""The CPU BGMV (worker/kernels/lora_gather) against a float64 loop, through real page tables."""

from __future__ import annotations

import torch

from tests.worker.memory_helpers import (
    manager_with,
    random_host_adapter,
    tiny_pool,
    tiny_shape,
    wait_on_host,
)
from worker.kernels import lora_gather
from worker.kernels.lora_meta import GROUP_PROJECTIONS, PROJECTIONS
from worker.kernels.lora_ref import Segments
from worker.lora.resident import ResidentAdapter
from worker.memory.allocator import PageKind
from worker.runner import _buckets


def test_gathered_products_match_float64_on_scattered_pages() -> None:
    shape = tiny_shape()
    layouts = [{"q_proj": 3, "v_proj": 5, "down_proj": 2}, {"q_proj": 4, "up_proj": 6}]
    hosts = {f"a{i}": random_host_adapter(f"a{i}", layouts[i % 2], shape, seed=i) for i in range(6)}
    pool = tiny_pool(160)
    for page in range(0, 160, 3):  # scattered: no long runs, rows straddle boundaries
        pool.allocator._free.remove(page)
        pool.allocator._kind[page], pool.allocator._owner[page] = PageKind.KV, "kv"
    manager = manager_with(pool, shape, hosts)
    residents: list[ResidentAdapter | None] = []
    for name in hosts:
        wait_on_host(manager, name)
        residents.append(manager.make_resident(name))
    rows = [0, 1, 2, 3, 4, 5, 6]  # row 6: base model
    segments = Segments.from_rows([0, 1, 2, 3, 4, 5, -1])
    adapters = [*residents, None]
    buckets = _buckets(segments, adapters, torch.device("cpu"))
    assert sorted(len(b.rows) for b in buckets) == [3, 3] and all(a is None for a in adapters)
    gen = torch.Generator().manual_seed(0)
    table = pool.flat.view(-1, shape.granule)
    for layer in range(shape.num_layers):
        for g, projections in enumerate(GROUP_PROJECTIONS):
            in_w = shape.in_widths[g]
            out_w = sum(c.stop - c.start for c in shape.out_cols[g])
            x = torch.randn(len(rows), in_w, generator=gen)
            y = torch.randn(len(rows), out_w, generator=gen)
            want = y.double().clone()
            for row, name in enumerate(hosts):
                for p, cols in zip(projections, shape.out_cols[g], strict=True):
                    lora = hosts[name].modules.get((layer, PROJECTIONS[p]))
                    if lora is not None:
                        want[row, cols] += x[row].double() @ lora.a.double().t() @ lora.b.double()
            for bucket in buckets:
                lora_gather.apply(table, x, y, bucket, layer, g, projections, shape.out_cols[g])
            torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
