"""BGMV over the page pool (Triton): LoRA for decode rows, one adapter slot per row.

Every weight row is read in place through the row table (lora_meta.py, docs/memory.md).
For layer l, group g and token row t with slot s = row_slot[t] ≥ 0:

    shrink   v[t, j] = Σ_i x[t, i] · A[j, i]                 j < a_rank[s, l, g]
             A[j, :] = pool[row_addr[a_row[s, l, g] + j] + (0 .. in_g)]
    expand   y[t, c_p + o] += Σ_{j < r} v[t, b_col[s, l, m] + j] · B_m[j, o]     o < w_p
             B_m[j, :] = pool[row_addr[b_row[s, l, m] + j] + (0 .. w_p)],  r = b_rank[s, l, m]

with m the p-th projection of the group and (c_p, w_p) = out_cols[p]. Shapes: x [T, in_g],
v [T, max_rank] float32 (zero where no row contributes: columns ≥ a_rank, base-model rows),
y [T, out_total] model dtype. Scales are folded into B at load, so there is no scale here.

Launch: one program per (row, block of ranks or output columns), a matrix-vector product
in float32 on CUDA cores: decode is bound by the bytes of A and B, which each row's
program streams once (rows sharing an adapter meet its rows in L2). A row whose slot is −1
leaves after loading its slot, so rows without an adapter cost nothing. Expand covers every
projection of the group in one launch; the shrink may split the input features over
`split_k` programs (float32 atomics).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from worker.kernels.checks import (
    FLOAT_DTYPES,
    check_meta,
    check_out_cols,
    check_row_align,
    check_shape,
    check_tensor,
)
from worker.kernels.lora_meta import GROUP_PROJECTIONS, LoraStepMeta
from worker.kernels.triton_util import check_launchable, pow2_at_least, sm_count


@dataclass(frozen=True)
class BgmvTiles:
    block_r: int = 16  # shrink: ranks per program; expand: ranks per step
    block_k: int = 256  # shrink: input features per step
    block_n: int = 256  # expand: output columns per program
    split_k: int = 1  # shrink: programs sharing one row's input features


def bgmv_tiles(tokens: int, in_features: int, max_rank: int, device: torch.device) -> BgmvTiles:
    """Tiles for a launch: split the input features until ~4 programs per SM stream bytes.

    Off CUDA (the interpreter runs programs one by one) few large programs are fastest.
    """
    if device.type != "cuda":
        return BgmvTiles(min(256, pow2_at_least(max_rank, 16)), 256, 256, 1)
    busy = tokens * triton.cdiv(max(1, max_rank), 16)  # 16 ranks × 256 features in registers
    split = 1
    while busy * split < 4 * sm_count(device) and in_features // (split * 2) >= 512:
        split *= 2
    return BgmvTiles(16, 256, 256, split)


@triton.jit
def _shrink_kernel(
    x_ptr,  # [T, in] model dtype, row stride stride_x
    v_ptr,  # [T, max_rank] float32, zeroed
    pool_ptr,  # [N] model dtype
    row_addr_ptr,  # [R] int64
    a_row_ptr,  # [n, L, G] int64
    a_rank_ptr,  # [n, L, G] int32
    row_slot_ptr,  # [T] int32
    in_features,
    k_chunk,  # input features per split (a multiple of BLOCK_K)
    slot_stride,  # L · G
    meta_off,  # l · G + g
    stride_x,
    stride_v,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(row_slot_ptr + t)
    if slot < 0:
        return
    meta = slot.to(tl.int64) * slot_stride + meta_off
    rank = tl.load(a_rank_ptr + meta)
    if tl.program_id(1) * BLOCK_R >= rank:
        return
    j = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R] ranks
    j_ok = j < rank
    addr = tl.load(row_addr_ptr + tl.load(a_row_ptr + meta) + j, mask=j_ok, other=0)
    addr = tl.multiple_of(addr, ROW_ALIGN)  # [BLOCK_R] int64: where A's rows start
    k_lo = tl.program_id(2) * k_chunk
    k_hi = tl.minimum(k_lo + k_chunk, in_features)
    prods = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)  # summed over k once, at the end
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        k_ok = k < k_hi
        xk = tl.load(x_ptr + t.to(tl.int64) * stride_x + k, mask=k_ok, other=0.0)  # [BLOCK_K]
        a = tl.load(
            pool_ptr + addr[:, None] + k[None, :], mask=j_ok[:, None] & k_ok[None, :], other=0.0
        )  # [BLOCK_R, BLOCK_K]
        prods += a.to(tl.float32) * xk.to(tl.float32)[None, :]
    acc = tl.sum(prods, axis=1)  # [BLOCK_R]
    out = v_ptr + t.to(tl.int64) * stride_v + j
    if SPLIT_K == 1:
        tl.store(out, acc, mask=j_ok)
    else:
        tl.atomic_add(out, acc, mask=j_ok)


@triton.jit
def _expand_kernel(
    y_ptr,  # [T, out_total] model dtype, row stride stride_y; updated in place
    v_ptr,  # [T, max_rank] float32
    pool_ptr,  # [N] model dtype
    row_addr_ptr,  # [R] int64
    b_row_ptr,  # [n, L, M] int64
    b_rank_ptr,  # [n, L, M] int32
    b_col_ptr,  # [n, L, M] int32
    row_slot_ptr,  # [T] int32
    slot_stride,  # L · M
    meta_off,  # l · M + (the group's first projection)
    col0,  # first column of part 0 in y, then its width; likewise parts 1 and 2
    width0,
    col1,
    width1,
    col2,
    width2,
    tiles0,  # column tiles of part 0
    tiles01,  # column tiles of parts 0 and 1
    stride_y,
    stride_v,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(row_slot_ptr + t)
    if slot < 0:
        return
    pid_n = tl.program_id(1)
    part = (pid_n >= tiles0).to(tl.int32) + (pid_n >= tiles01).to(tl.int32)
    meta = slot.to(tl.int64) * slot_stride + meta_off + part
    rank = tl.load(b_rank_ptr + meta)
    if rank == 0:
        return
    col = tl.where(part == 0, col0, tl.where(part == 1, col1, col2))
    width = tl.where(part == 0, width0, tl.where(part == 1, width1, width2))
    n_tile = pid_n - tl.where(part == 0, 0, tl.where(part == 1, tiles0, tiles01))
    first = tl.load(b_row_ptr + meta)
    v_row = v_ptr + t.to(tl.int64) * stride_v + tl.load(b_col_ptr + meta)
    n = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] columns of the part
    n_ok = n < width
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j0 in range(0, rank, BLOCK_R):
        j = j0 + tl.arange(0, BLOCK_R)  # [BLOCK_R]
        j_ok = j < rank
        vj = tl.load(v_row + j, mask=j_ok, other=0.0)  # [BLOCK_R] float32
        addr = tl.multiple_of(tl.load(row_addr_ptr + first + j, mask=j_ok, other=0), ROW_ALIGN)
        b = tl.load(
            pool_ptr + addr[:, None] + n[None, :], mask=j_ok[:, None] & n_ok[None, :], other=0.0
        )  # [BLOCK_R, BLOCK_N]
        acc += tl.sum(vj[:, None] * b.to(tl.float32), axis=0)
    ys = y_ptr + t.to(tl.int64) * stride_y + col + n
    y = tl.load(ys, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(ys, (y + acc).to(y_ptr.dtype.element_ty), mask=n_ok)


def bgmv_shrink(
    x: torch.Tensor,  # [T, in_g]
    meta: LoraStepMeta,
    layer: int,
    group: int,
    *,
    row_align: int = 1,
    tiles: BgmvTiles | None = None,
) -> torch.Tensor:  # [T, max_rank] float32
    """v = x · Aᵀ per row's adapter (module docstring); zero where no row contributes.

    row_align: a promise that every row_addr is a multiple of it (elements), so the kernel
    may load A's rows in vectors; docs/memory.md's geometry gives gcd(E, row widths).
    """
    check_tensor("x", x, dtype=FLOAT_DTYPES, ndim=2, inner_contiguous=True)
    _check_common(x, meta, layer, group)
    check_row_align(row_align, [x.shape[1]], meta.pool)
    tokens, in_features = x.shape
    v = torch.zeros(tokens, meta.max_rank, dtype=torch.float32, device=x.device)
    if tokens == 0 or meta.max_rank == 0:
        return v
    t = tiles or bgmv_tiles(tokens, in_features, meta.max_rank, x.device)
    k_chunk = triton.cdiv(triton.cdiv(in_features, t.split_k), t.block_k) * t.block_k
    grid = (tokens, triton.cdiv(meta.max_rank, t.block_r), t.split_k)
    num_layers, num_groups = meta.a_row.shape[1], meta.a_row.shape[2]
    _shrink_kernel[grid](
        x, v, meta.pool, meta.row_addr, meta.a_row, meta.a_rank, meta.row_slot,
        in_features, k_chunk, num_layers * num_groups, layer * num_groups + group,
        x.stride(0), v.stride(0),
        BLOCK_R=t.block_r, BLOCK_K=t.block_k, SPLIT_K=t.split_k, ROW_ALIGN=row_align,
    )  # fmt: skip
    return v


def bgmv_expand(
    y: torch.Tensor,  # [T, out_total], updated in place
    v: torch.Tensor,  # [T, max_rank] float32 (bgmv_shrink's output)
    meta: LoraStepMeta,
    layer: int,
    group: int,
    out_cols: Sequence[tuple[int, int]],  # per projection of the group: (first column, width)
    *,
    row_align: int = 1,
    tiles: BgmvTiles | None = None,
) -> None:
    """y[t, c_p + o] += v[t, b_col + j] · B_m[j, o] per row's adapter, every part at once.

    Rows without an adapter, and parts whose projection the row's slot does not target, are
    left bit-identical. The widths in out_cols must be the B rows' widths in the pool.
    """
    check_tensor("y", y, dtype=FLOAT_DTYPES, ndim=2, inner_contiguous=True)
    _check_common(y, meta, layer, group)
    check_tensor("v", v, dtype=torch.float32, device=y.device, ndim=2, inner_contiguous=True)
    if v.shape[0] != y.shape[0] or v.shape[1] < meta.max_rank:
        raise ValueError(f"v: shape {tuple(v.shape)}, expected [{y.shape[0]}, ≥ {meta.max_rank}]")
    parts = check_out_cols(out_cols, group, y.shape[1])
    check_row_align(row_align, [w for _, w in parts], meta.pool)
    tokens = y.shape[0]
    if tokens == 0 or meta.max_rank == 0:
        return
    t = tiles or bgmv_tiles(tokens, 0, meta.max_rank, y.device)
    col_tiles = [triton.cdiv(w, t.block_n) for _, w in parts]
    padded = list(parts) + [(0, 0)] * (3 - len(parts))
    num_layers, num_proj = meta.b_row.shape[1], meta.b_row.shape[2]
    _expand_kernel[(tokens, sum(col_tiles))](
        y, v, meta.pool, meta.row_addr, meta.b_row, meta.b_rank, meta.b_col, meta.row_slot,
        num_layers * num_proj, layer * num_proj + GROUP_PROJECTIONS[group][0],
        padded[0][0], padded[0][1], padded[1][0], padded[1][1], padded[2][0], padded[2][1],
        col_tiles[0], sum(col_tiles[:2]), y.stride(0), v.stride(0),
        BLOCK_R=t.block_r, BLOCK_N=t.block_n, ROW_ALIGN=row_align,
    )  # fmt: skip


def _check_common(t: torch.Tensor, meta: LoraStepMeta, layer: int, group: int) -> None:
    """Meta on t's device, one slot per row of t, the pool in t's dtype, launchable here."""
    check_meta(meta, t.device, layer, group)
    check_shape("meta.row_slot", meta.row_slot, (t.shape[0],))
    if meta.pool.dtype != t.dtype:
        raise ValueError(f"meta.pool: dtype {meta.pool.dtype}, expected {t.dtype} (the model's)")
    check_launchable(_shrink_kernel, t.device)
