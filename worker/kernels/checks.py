"""Argument checks shared by the paged ops' wrappers (torch only; no Triton needed).

Every wrapper validates before it launches: a wrong dtype, device, layout or shape is a
ValueError naming the argument, never a silent misread of the page pool.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from worker.kernels.lora_meta import GROUP_PROJECTIONS, GROUPS, PROJECTIONS, LoraStepMeta

# field → dtype of the per-step LoRA metadata (lora_meta.py)
META_DTYPES: dict[str, torch.dtype] = {
    "row_addr": torch.int64,
    "a_row": torch.int64,
    "a_rank": torch.int32,
    "b_row": torch.int64,
    "b_rank": torch.int32,
    "b_col": torch.int32,
    "seg_start": torch.int32,
    "seg_slot": torch.int32,
    "row_slot": torch.int32,
}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The kernels address part p of group g as projection GROUP_PROJECTIONS[g][0] + p.
assert all(ps == tuple(range(ps[0], ps[0] + len(ps))) for ps in GROUP_PROJECTIONS)


def check_tensor(
    name: str,
    t: torch.Tensor,
    *,
    dtype: torch.dtype | tuple[torch.dtype, ...] | None = None,
    device: torch.device | None = None,
    ndim: int | None = None,
    contiguous: bool = False,
    inner_contiguous: bool = False,
) -> None:
    """Raise ValueError unless `t` has the dtype, device, rank and layout asked for."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
    allowed = (dtype,) if isinstance(dtype, torch.dtype) else dtype
    if allowed is not None and t.dtype not in allowed:
        raise ValueError(f"{name}: dtype {t.dtype}, expected {' or '.join(map(str, allowed))}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: on {t.device}, expected {device} (every operand on one device)")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: {t.dim()}-D {tuple(t.shape)}, expected {ndim}-D")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous (strides {t.stride()})")
    if inner_contiguous and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: the last dimension must be contiguous (strides {t.stride()})")


def check_shape(name: str, t: torch.Tensor, shape: Sequence[int]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: shape {tuple(t.shape)}, expected {tuple(shape)}")


def check_meta(meta: LoraStepMeta, device: torch.device, layer: int, group: int) -> None:
    """The metadata's dtypes, device, contiguity and mutually consistent shapes."""
    for name, dtype in META_DTYPES.items():
        check_tensor(f"meta.{name}", getattr(meta, name), dtype=dtype, device=device)
        check_tensor(f"meta.{name}", getattr(meta, name), contiguous=True)
    check_tensor("meta.pool", meta.pool, dtype=FLOAT_DTYPES, device=device, ndim=1)
    check_tensor("meta.pool", meta.pool, contiguous=True)
    n, num_layers = meta.a_row.shape[:2] if meta.a_row.dim() == 3 else (-1, -1)
    for name in ("a_row", "a_rank"):
        check_shape(f"meta.{name}", getattr(meta, name), (n, num_layers, len(GROUPS)))
    for name in ("b_row", "b_rank", "b_col"):
        check_shape(f"meta.{name}", getattr(meta, name), (n, num_layers, len(PROJECTIONS)))
    if meta.seg_start.dim() != 1 or meta.seg_start.shape[0] != meta.seg_slot.shape[0] + 1:
        raise ValueError(
            f"meta.seg_start: shape {tuple(meta.seg_start.shape)}, expected [S + 1] "
            f"with S = {meta.seg_slot.shape[0]} segments"
        )
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} out of range [0, {num_layers})")
    if not 0 <= group < len(GROUPS):
        raise ValueError(f"group {group} out of range [0, {len(GROUPS)}): {GROUPS}")
    if meta.max_rank < 0:
        raise ValueError(f"meta.max_rank {meta.max_rank} is negative")


def check_out_cols(
    out_cols: Sequence[tuple[int, int]], group: int, out_total: int
) -> tuple[tuple[int, int], ...]:
    """One (first column, width) per projection of the group, each inside the fused output."""
    parts = tuple((int(c), int(w)) for c, w in out_cols)
    expected = len(GROUP_PROJECTIONS[group])
    if len(parts) != expected:
        raise ValueError(
            f"out_cols: {len(parts)} parts for group {GROUPS[group]}, expected {expected} "
            f"({', '.join(PROJECTIONS[m] for m in GROUP_PROJECTIONS[group])})"
        )
    for first, width in parts:
        if first < 0 or width <= 0 or first + width > out_total:
            raise ValueError(f"out_cols: part ({first}, {width}) outside y's {out_total} columns")
    return parts


def check_row_align(row_align: int, widths: Sequence[int], pool: torch.Tensor) -> None:
    """row_align (a promise: every row_addr is a multiple of it) must be a power of two that
    divides the rows' widths and the pool's base address, or the kernels' vector loads fault."""
    if row_align < 1 or row_align & (row_align - 1):
        raise ValueError(f"row_align {row_align} must be a power of two")
    for w in widths:
        if w % row_align:
            raise ValueError(f"row_align {row_align} does not divide the row width {w}")
    if pool.data_ptr() % (row_align * pool.element_size()):
        raise ValueError(f"row_align {row_align}: the pool's base address is not aligned to it")
