"""The CPU's C BGMV (worker/kernels/lora_cpu.c), the op the CPU path runs for decode rows,
against a float64 loop through real page tables: swept over rank mix × adapter popularity ×
batch size, on a pool whose free pages are scattered (rows land on page boundaries), with
base-model rows and rows the kernel is not given in the batch; and its argument checks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from tests.worker.memory_helpers import manager_with, random_host_adapter, tiny_shape, wait_on_host
from tests.worker.test_lora_gather import LAYOUTS, POPULARITY, RANKS, narrowed, pool_of, separate
from worker.kernels import lora_cpu
from worker.kernels.lora_cpu import CpuLora
from worker.kernels.lora_meta import GROUP_PROJECTIONS, PROJECTIONS, LoraStepMeta
from worker.kernels.lora_ref import Segments
from worker.lora.adapter import HostAdapter
from worker.lora.resident import ResidentAdapter
from worker.runner import _step_meta, slot_tables

TOLERANCE = 1e-5  # ‖out − ref‖ / ‖ref‖, float32


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> CpuLora:
    built = lora_cpu.load(tmp_path_factory.mktemp("kernels"))
    assert built is not None, "this host (and CI) has a C compiler: the kernel must build"
    return built


def batch_of(
    slots: list[int], ranks: str, rows_dtype: torch.dtype = torch.float32
) -> tuple[dict[str, HostAdapter], list[ResidentAdapter], LoraStepMeta]:
    """The adapters of `slots` paged into a scattered float32 pool whose adapter rows are
    `rows_dtype` (EngineConfig.lora_dtype), and the step's metadata."""
    shape = tiny_shape()
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
    pool = pool_of(torch.float32, 6000, rows_dtype)
    manager = manager_with(pool, shape, hosts)
    residents = []
    for name in names:
        wait_on_host(manager, name)
        resident = manager.make_resident(name)
        assert resident is not None
        residents.append(resident)
    row_slots = [names.index(f"a{s}") if s >= 0 else -1 for s in slots]
    tables = slot_tables(residents)
    meta = _step_meta(pool.lora, tables, Segments.from_rows(row_slots), row_slots, 1)
    return hosts, residents, meta


# Runs of one adapter (prefill chunks, verifications: the kernel's tasks take 4 to 32
# consecutive rows of one slot, in tiles of four rows and a remainder row by row),
# shorter and longer than a task, between other rows.
RUNS = {
    "runs": lambda n: [0] * 11 + [1] * 3 + [-1] + [2] * (n + 4) + [0, 1, 1],
    "one long run": lambda n: [0] * (n + 9),
}


@pytest.mark.parametrize("rows_dtype", list(lora_cpu.WEIGHT_DTYPES), ids=str)
@pytest.mark.parametrize("ranks", list(RANKS))
@pytest.mark.parametrize("popularity", [*POPULARITY, *RUNS])
@pytest.mark.parametrize("batch", [1, 5, 16])
def test_kernel_matches_float64(
    kernel: CpuLora, rows_dtype: torch.dtype, ranks: str, popularity: str, batch: int
) -> None:
    """Adapter rows float32 or bfloat16 (widened as read: the reference reads them as
    stored, so both are held to float32's bound)."""
    shape = tiny_shape()
    if popularity in RUNS:
        slots = RUNS[popularity](batch)
    else:
        slots = separate(POPULARITY[popularity](batch))
    hosts, _, meta = batch_of(slots, ranks, rows_dtype)
    assert meta.pool.dtype == rows_dtype
    names = sorted(hosts)
    # Every third adapter row is left to another op (slot -1 for the kernel): untouched
    # (runs are kept whole, to cross the kernel's task boundaries).
    keep = [popularity in RUNS or i % 3 != 2 for i in range(len(slots))]
    given = torch.tensor(
        [s if k else -1 for s, k in zip(meta.row_slot.tolist(), keep, strict=True)]
    )
    step = kernel.step(meta, given.to(torch.int32), shape.out_cols)
    gen = torch.Generator().manual_seed(batch)
    for layer in range(shape.num_layers):
        for g, projections in enumerate(GROUP_PROJECTIONS):
            x = torch.randn(len(slots), shape.in_widths[g], generator=gen)
            y = torch.randn(len(slots), shape.out_cols[g][-1].stop, generator=gen)
            want = y.double().clone()
            for row, slot in enumerate(given.tolist()):
                for p, cols in zip(projections, shape.out_cols[g], strict=True):
                    adapter = hosts[names[slot]] if slot >= 0 else None
                    lora = adapter.modules.get((layer, PROJECTIONS[p])) if adapter else None
                    if lora is not None:
                        want[row, cols] += x[row].double() @ lora.a.double().t() @ lora.b.double()
            step.apply(x, y, layer, g)
            error = (y.double() - want).norm() / want.norm()
            assert error <= TOLERANCE, f"layer {layer} group {g}: {error:.2e}"
            untouched = [row for row, slot in enumerate(given.tolist()) if slot < 0]
            assert torch.equal(y[untouched].double(), want[untouched])


def test_bad_arguments_are_refused_before_the_kernel_runs(kernel: CpuLora) -> None:
    shape = tiny_shape()
    _, _, meta = batch_of([0, 1, -1, 2], "ranks 4-16")
    cols = shape.out_cols
    step = kernel.step(meta, meta.row_slot, cols)
    x = torch.randn(4, shape.in_widths[0])
    y = torch.zeros(4, shape.out_cols[0][-1].stop)
    with pytest.raises(ValueError, match="dtype"):
        step.apply(x.double(), y, 0, 0)
    with pytest.raises(ValueError, match="rows"):
        step.apply(x[:3], y[:3], 0, 0)
    with pytest.raises(ValueError, match="contiguous"):
        step.apply(x, torch.zeros(y.shape[1], 4).t(), 0, 0)
    for layer, group in ((shape.num_layers, 0), (-1, 0), (0, len(GROUP_PROJECTIONS))):
        with pytest.raises(ValueError, match="out of range"):
            step.apply(x, y, layer, group)
    with pytest.raises(ValueError, match="outside y"):  # y narrower than the group's parts
        step.apply(x, y[:, : y.shape[1] - 1], 0, 0)
    with pytest.raises(ValueError, match="out_cols"):  # q, k and v: three parts, not two
        kernel.step(meta, meta.row_slot, (cols[0][:2], *cols[1:]))
    with pytest.raises(ValueError, match="out_cols"):  # a group missing
        kernel.step(meta, meta.row_slot, cols[:3])
    with pytest.raises(ValueError, match="slot"):
        kernel.step(meta, torch.tensor([0, 9, -1, 2], dtype=torch.int32), cols)
    with pytest.raises(ValueError, match="dtype"):  # rows it has no entry point for
        kernel.step(_replace(meta, pool=meta.pool.to(torch.float16)), meta.row_slot, cols)
    outside = meta.row_addr.clone()
    outside[0] = meta.pool.numel()
    with pytest.raises(ValueError, match="outside the pool"):
        kernel.step(_replace(meta, row_addr=outside), meta.row_slot, cols)
    past = meta.b_col.clone()
    past[0, 0, 0] = int(meta.a_rank[0, 0, 0])  # q's ranks would start past the A rows
    if int(meta.b_rank[0, 0, 0]) > 0:
        with pytest.raises(ValueError, match="b_col"):
            kernel.step(_replace(meta, b_col=past), meta.row_slot, cols)
    assert torch.equal(y, torch.zeros_like(y))  # nothing ran


def _replace(meta: LoraStepMeta, **fields: torch.Tensor) -> LoraStepMeta:
    return dataclasses.replace(meta, **fields)


def test_no_compiler_means_no_kernel_and_a_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert lora_cpu.load(tmp_path / "kernels") is None
    assert "unavailable" in caplog.text


def test_a_built_kernel_is_reused(tmp_path: Path) -> None:
    assert lora_cpu.load(tmp_path) is not None
    built = list(tmp_path.glob("lora_cpu-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    assert lora_cpu.load(tmp_path) is not None
    assert built[0].stat().st_mtime_ns == stamp and list(tmp_path.glob("*")) == built


def test_slot_tables_are_reused_only_for_the_same_resident_objects() -> None:
    _, residents, meta = batch_of([0, 1, 2], "ranks 4-16")
    tables = slot_tables(residents)
    assert tables.serves(residents) and tables.serves(list(residents))
    assert not tables.serves(residents[::-1])  # another slot order: other indices
    assert not tables.serves(residents[:2])
    copy = dataclasses.replace(residents[1])  # the same adapter paged in again: a new object
    assert not tables.serves([residents[0], copy, residents[2]])
    assert torch.equal(tables.row_addr, meta.row_addr)
