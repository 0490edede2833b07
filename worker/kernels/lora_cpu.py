"""BGMV on the CPU in C: the decode rows' LoRA read in place from the page pool.

The torch ops have no gathered matrix-vector product: the reference either copies every
row's A out of the pool each step (lora_gather: gather + bmm, half the adapter bytes
copied, and thousands of small ops per step) or loops. `lora_cpu.c` reads A and B through
the row table where they lie, one call per layer and group for the whole batch, rows in
parallel. Its semantics are lora_meta.py's, the same tables the Triton kernels read, so
the runner builds one LoraStepMeta on every device.

It is compiled on first use with the host's C compiler (`cc -O3 -march=native -fopenmp`)
into a cache directory, keyed by the source, the flags and the CPU, and loaded with ctypes
(calls release the GIL). Without a compiler, `load` returns None and says why; the engine
then runs the torch gathers, which give the same results more slowly.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from worker.kernels.checks import check_meta, check_out_cols, check_tensor
from worker.kernels.lora_meta import GROUP_PROJECTIONS, GROUPS, PROJECTIONS, LoraStepMeta

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("lora_cpu.c")
FLAGS: tuple[str, ...] = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11")
if platform.machine() in ("x86_64", "AMD64"):  # full-width AVX-512 where the CPU has it
    FLAGS += ("-mprefer-vector-width=512",)
_I64, _I32, _PTR = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p
# the adapter rows' dtypes it reads (x, y and its sums are float32), and their entry points
WEIGHT_DTYPES = {torch.float32: "lora_bgmv_f32", torch.bfloat16: "lora_bgmv_bf16"}
# lora_bgmv_f32's and lora_bgmv_bf16's parameters, in order (lora_cpu.c)
_ARGTYPES: list[Any] = [_PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64]
_ARGTYPES += [_I32, _PTR, _PTR, _PTR, _I64, _PTR, _I64, _I64, _PTR, _I64, _I32]


class CpuLora:
    """The loaded library: `step(meta, ...)` validates one step's tables once; the step's
    `apply` runs one layer and group."""

    def __init__(self, library: ctypes.CDLL) -> None:
        # by the dtype of the pool's adapter rows (EngineConfig.lora_dtype)
        self._fns: dict[torch.dtype, Callable[..., int]] = {}
        for dtype, name in WEIGHT_DTYPES.items():
            fn = getattr(library, name)
            fn.argtypes, fn.restype = _ARGTYPES, ctypes.c_int
            self._fns[dtype] = fn
        self._checked: tuple[Any, ...] | None = None  # the tables last checked (identity)
        self._out_cols: dict[tuple[tuple[tuple[int, int], ...], ...], tuple[_Parts, ...]] = {}

    def step(
        self,
        meta: LoraStepMeta,
        row_slot: torch.Tensor,
        out_cols: Sequence[Sequence[slice]],
    ) -> CpuLoraStep:
        """The step's tables, checked: `row_slot` [T] int32 picks the rows this kernel
        runs (-1: not this kernel's; the runner gives long segments to GEMMs on views);
        `out_cols[g]` holds the columns of each of group g's projections in its fused
        output y (ModelShape.out_cols)."""
        device = torch.device("cpu")
        check_meta(meta, device, 0, 0)
        check_tensor("meta.pool", meta.pool, dtype=tuple(WEIGHT_DTYPES))
        check_tensor("row_slot", row_slot, dtype=torch.int32, device=device, ndim=1)
        check_tensor("row_slot", row_slot, contiguous=True)
        tables = tuple(getattr(meta, name) for name in _TABLES)
        # The runner reuses one step's tables while its adapters stay (runner.SlotTables):
        # their bounds were checked then, and tensors are not changed in place.
        last = self._checked
        if (
            last is None
            or tables[-1] != last[-1]
            or any(a is not b for a, b in zip(tables[:-1], last[:-1], strict=True))
        ):
            _check_tables(meta)
            self._checked = tables
        n = meta.a_row.shape[0]
        if row_slot.numel() and int(row_slot.max()) >= n:
            raise ValueError(f"row_slot: slot {int(row_slot.max())} of {n}")
        return CpuLoraStep(self._fns[meta.pool.dtype], meta, row_slot, self._parts(out_cols))

    def _parts(self, out_cols: Sequence[Sequence[slice]]) -> tuple[_Parts, ...]:
        """Each group's parts as C arrays, checked once per distinct `out_cols` (a model's)."""
        key = tuple(tuple((int(c.start), int(c.stop - c.start)) for c in g) for g in out_cols)
        parts = self._out_cols.get(key)
        if parts is None:
            if len(key) != len(GROUPS):
                raise ValueError(f"out_cols: {len(key)} groups, expected {len(GROUPS)}")
            built = []
            for g, cols in enumerate(key):
                checked = check_out_cols(cols, g, max((c + w for c, w in cols), default=0))
                starts = (ctypes.c_int64 * len(checked))(*(c for c, _ in checked))
                widths = (ctypes.c_int64 * len(checked))(*(w for _, w in checked))
                built.append(_Parts(starts, widths, len(checked), max(c + w for c, w in checked)))
            parts = self._out_cols[key] = tuple(built)
        return parts


@dataclass(frozen=True)
class _Parts:
    """One group's projections in its fused output: first columns and widths (C arrays)."""

    starts: Any
    widths: Any
    count: int
    reach: int  # the columns y must have


@dataclass(frozen=True)
class CpuLoraStep:
    fn: Callable[..., int]
    meta: LoraStepMeta
    row_slot: torch.Tensor  # [T] int32
    parts: tuple[_Parts, ...]  # per group
    # Every call's arguments but x's and y's, prepared once per step: a call comes right
    # after a base GEMM, whose weights have pushed the interpreter's data out of the
    # caches, and there every attribute read, conversion and check costs (a per-call
    # wrapper measured ~38 µs there; the calls index this list and check x and y only).
    _calls: list[tuple[Any, ...]] = field(init=False, repr=False)
    _rows: int = field(init=False, repr=False)
    _max_rank: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        meta, groups, projections = self.meta, len(GROUPS), len(PROJECTIONS)
        layers = int(meta.a_row.shape[1])
        tables = (meta.pool, meta.row_addr, meta.a_row, meta.a_rank, meta.b_row, meta.b_rank)
        head = (*(t.data_ptr() for t in tables), meta.b_col.data_ptr())
        head += (layers * groups, layers * projections)
        rows = self.row_slot.shape[0]
        tail = (self.row_slot.data_ptr(), rows)
        calls = []
        for layer in range(layers):
            for g, part in enumerate(self.parts):
                first = layer * projections + GROUP_PROJECTIONS[g][0]
                offsets = (layer * groups + g, first, part.count, part.starts, part.widths)
                calls.append((*head, *offsets, *tail))
        object.__setattr__(self, "_calls", calls)
        object.__setattr__(self, "_rows", rows)
        object.__setattr__(self, "_max_rank", max(1, meta.max_rank))

    def apply(
        self,
        x: torch.Tensor,  # [T, in_g] float32
        y: torch.Tensor,  # [T, out_total] float32, updated in place
        layer: int,
        group: int,
    ) -> None:
        """y[t] += the LoRA of row t's adapter for `layer` and `group`, every row with a slot."""
        rows, groups = self._rows, len(GROUPS)
        if not (0 <= group < groups and 0 <= layer * groups + group < len(self._calls)):
            raise ValueError(f"layer {layer}, group {group}: out of range")
        if not (_plain(x, rows) and _plain(y, rows)):  # the per-call fast path; else say why
            for name, t in (("x", x), ("y", y)):
                check_tensor(name, t, dtype=torch.float32, device=self.meta.pool.device, ndim=2)
                check_tensor(name, t, inner_contiguous=True)
                if t.shape[0] != rows:
                    raise ValueError(f"{name}: {t.shape[0]} rows, the step has {rows}")
        if self.parts[group].reach > y.shape[1]:
            raise ValueError(f"out_cols: a part outside y's {y.shape[1]} columns")
        status = self.fn(
            *self._calls[layer * groups + group],
            x.data_ptr(),
            x.stride(0),
            x.shape[1],
            y.data_ptr(),
            y.stride(0),
            self._max_rank,
        )
        if status != 0:
            raise MemoryError("the CPU LoRA kernel could not allocate its task list")


def _plain(t: torch.Tensor, rows: int) -> bool:
    """A float32 CPU matrix of `rows` rows whose rows are contiguous."""
    return (
        t.dtype is torch.float32
        and t.device.type == "cpu"
        and t.dim() == 2
        and t.shape[0] == rows
        and (t.stride(1) == 1 or t.shape[1] <= 1)
    )


_TABLES = ("pool", "row_addr", "a_row", "a_rank", "b_row", "b_rank", "b_col", "max_rank")


def _check_tables(meta: LoraStepMeta) -> None:
    """What C cannot check for itself: every row index and column a slot can reach lies
    inside its table (a bad table would read outside the pool, not raise)."""
    num_rows = meta.row_addr.shape[0]
    if num_rows and (int(meta.row_addr.min()) < 0 or int(meta.row_addr.max()) >= meta.pool.numel()):
        raise ValueError("meta.row_addr: an address outside the pool")
    for kind, row, rank in (("a", meta.a_row, meta.a_rank), ("b", meta.b_row, meta.b_rank)):
        used = rank > 0
        if bool((row[used] < 0).any()) or bool((row[used] + rank[used] > num_rows).any()):
            raise ValueError(f"meta.{kind}_row: rows outside row_addr")
    if meta.a_rank.numel() and int(meta.a_rank.max()) > meta.max_rank:
        raise ValueError(f"meta.a_rank: a rank above max_rank {meta.max_rank}")
    for g, projections in enumerate(GROUP_PROJECTIONS):
        for m in projections:
            used = meta.b_rank[:, :, m] > 0
            reach = (meta.b_col[:, :, m] + meta.b_rank[:, :, m])[used]
            if bool((reach > meta.a_rank[:, :, g][used]).any()):
                raise ValueError(f"meta.b_col: {PROJECTIONS[m]}'s ranks pass its group's A rows")


def kernel_for(
    device: torch.device, dtype: torch.dtype, build_dir: Path, enabled: bool = True
) -> CpuLora | None:
    """The kernel for a model on `device` in `dtype`: built (or found) in `build_dir` for a
    float32 model on the CPU when `enabled`; None everywhere else (the kernels of that device
    or the torch fallback run)."""
    if not enabled or device.type != "cpu" or dtype != torch.float32:
        return None
    return load(build_dir)


def load(build_dir: Path) -> CpuLora | None:
    """The compiled kernel (built into `build_dir` once per source, flags and CPU), or None
    when this host cannot build it (no compiler, or it failed: logged with its output)."""
    try:
        path = _build(build_dir)
        kernel = CpuLora(ctypes.CDLL(str(path)))
        log.info("CPU LoRA kernel loaded from %s", path)
        return kernel
    except (OSError, subprocess.SubprocessError, _BuildError) as e:
        log.warning("the CPU LoRA kernel is unavailable (%s): using the torch gathers", e)
        return None


class _BuildError(RuntimeError):
    pass


def _build(build_dir: Path) -> Path:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise _BuildError("no C compiler (cc or gcc) on PATH")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join((compiler, *FLAGS, _cpu_id())).encode()).hexdigest()
    target = build_dir / f"lora_cpu-{key[:16]}.so"
    if target.exists():
        return target
    build_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=build_dir) as tmp:
        out = Path(tmp) / target.name
        done = subprocess.run(
            [compiler, *FLAGS, "-o", str(out), str(SOURCE)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if done.returncode != 0:
            raise _BuildError(f"{compiler} failed: {done.stderr.strip()[-2000:]}")
        os.replace(out, target)  # atomic: concurrent builders each install a whole file
    return target


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine() + platform.processor()
    lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))]
    return platform.machine() + "".join(sorted(set(lines)))
