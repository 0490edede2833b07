"""SGMV over the page pool (Triton): LoRA for runs of tokens that share an adapter.

Prefill and speculative verification. Tokens come sorted into S segments (rows
[seg_start[i], seg_start[i+1]) share the adapter slot seg_slot[i]; −1 is the base model);
every weight row is read in place through the row table (lora_meta.py, docs/memory.md).
For layer l, group g, segment i with slot s = seg_slot[i] ≥ 0 and t in the segment:

    shrink   v[t, j] = Σ_i x[t, i] · A[j, i]                 j < a_rank[s, l, g]
             A[j, :] = pool[row_addr[a_row[s, l, g] + j] + (0 .. in_g)]
    expand   y[t, c_p + o] += Σ_{j < r} v[t, b_col[s, l, m] + j] · B_m[j, o]     o < w_p
             B_m[j, :] = pool[row_addr[b_row[s, l, m] + j] + (0 .. w_p)],  r = b_rank[s, l, m]

with m the p-th projection of the group and (c_p, w_p) = out_cols[p]. Shapes: x [T, in_g],
v [T, max_rank] float32 (zero where no row contributes: columns ≥ a_rank, base-model rows),
y [T, out_total] model dtype. Scales are folded into B at load, so there is no scale here.

Launch: one program per (segment tile of BLOCK_M rows, block of ranks or output columns);
the grid has cdiv(T, BLOCK_M) + S tile slots so the host needs no segment lengths, and
programs past the last tile, of base-model segments or past their slot's rank leave at
once. Expand covers every projection of the group (q, k, v; gate, up) in one launch.
The shrink may split the input features over `split_k` programs (float32 atomics). On
CUDA, fp16/bf16 tiles go to the tensor cores with float32 accumulators; the expand rounds
v to the model dtype for them (half an ulp of the LoRA term), and adds into y in float32,
rounding once. Segment lengths are not checked against T (that would sync the host):
seg_start[S] must equal T.
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
    check_tensor,
)
from worker.kernels.lora_meta import GROUP_PROJECTIONS, LoraStepMeta
from worker.kernels.triton_util import (
    check_launchable,
    native_dot,
    pow2_at_least,
    sm_count,
)


@dataclass(frozen=True)
class SgmvTiles:
    block_m: int = 16  # token rows per program (tl.dot needs ≥ 16)
    block_r: int = 16  # shrink: ranks per program; expand: ranks per step
    block_k: int = 64  # shrink: input features per step
    block_n: int = 64  # expand: output columns per program
    split_k: int = 1  # shrink: programs sharing one row tile's input features

    @property
    def expand_warps(self) -> int:
        """Warps for the expand: 8 for 64-row tiles, whose 64 × 128 accumulator spills
        registers with 4 (sm_90, bf16: bench/kernel_compile.py reports it), else 4."""
        return 8 if self.block_m >= 64 else 4


def sgmv_tiles(
    tokens: int, segments: int, in_features: int, max_rank: int, device: torch.device
) -> SgmvTiles:
    """Tiles for a launch: taller row tiles for long segments, split-K until the GPU fills.

    Off CUDA (the interpreter runs programs one by one) few large programs are fastest.
    """
    if device.type != "cuda":
        return SgmvTiles(32, min(256, pow2_at_least(max_rank, 16)), 64, 128, 1)
    per_segment = tokens / max(1, segments)
    block_m = 16 if per_segment <= 16 else 32 if per_segment <= 64 else 64
    block_r = min(64, pow2_at_least(max_rank, 16))
    busy = (triton.cdiv(tokens, block_m) + segments) * triton.cdiv(max(1, max_rank), block_r)
    split = 1
    while busy * split < 2 * sm_count(device) and in_features // (split * 2) >= 256:
        split *= 2
    return SgmvTiles(block_m, block_r, 64, 128, split)


@triton.jit
def _shrink_kernel(
    x_ptr,  # [T, in] model dtype, row stride stride_x
    v_ptr,  # [T, max_rank] float32, zeroed
    pool_ptr,  # [N] model dtype
    row_addr_ptr,  # [R] int64
    a_row_ptr,  # [n, L, G] int64
    a_rank_ptr,  # [n, L, G] int32
    seg_start_ptr,  # [S + 1] int32
    seg_slot_ptr,  # [S] int32
    num_segs,
    in_features,
    k_chunk,  # input features per split (a multiple of BLOCK_K)
    slot_stride,  # L · G
    meta_off,  # l · G + g
    stride_x,
    stride_v,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SEG_BLOCK: tl.constexpr,
    SPLIT_K: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
    NATIVE: tl.constexpr,
):
    # Which segment and which of its BLOCK_M-row tiles: the tiles of all segments in order.
    i = tl.arange(0, SEG_BLOCK)
    lo = tl.load(seg_start_ptr + i, mask=i < num_segs, other=0)
    hi = tl.load(seg_start_ptr + i + 1, mask=i < num_segs, other=0)
    tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M  # [SEG_BLOCK], 0 past num_segs
    seg = tl.sum((tl.cumsum(tiles, 0) <= tl.program_id(0)).to(tl.int32), 0)
    if seg >= num_segs:
        return
    tile = tl.program_id(0) - tl.sum(tl.where(i < seg, tiles, 0), 0)
    slot = tl.load(seg_slot_ptr + seg)
    if slot < 0:
        return
    meta = slot.to(tl.int64) * slot_stride + meta_off
    rank = tl.load(a_rank_ptr + meta)
    j = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R] ranks
    if tl.program_id(1) * BLOCK_R >= rank:
        return
    rows = tl.load(seg_start_ptr + seg) + tile * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    row_ok = rows < tl.load(seg_start_ptr + seg + 1)
    j_ok = j < rank
    addr = tl.load(row_addr_ptr + tl.load(a_row_ptr + meta) + j, mask=j_ok, other=0)
    addr = tl.multiple_of(addr, ROW_ALIGN)  # [BLOCK_R] int64: where A's rows start
    k_lo = tl.program_id(2) * k_chunk
    k_hi = tl.minimum(k_lo + k_chunk, in_features)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        k_ok = k < k_hi
        xt = tl.load(
            x_ptr + rows[:, None].to(tl.int64) * stride_x + k[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_K]
        at = tl.load(
            pool_ptr + addr[None, :] + k[:, None], mask=j_ok[None, :] & k_ok[:, None], other=0.0
        )  # [BLOCK_K, BLOCK_R] = Aᵀ tile
        if NATIVE:  # fp16/bf16 tensor cores, float32 accumulator
            acc = tl.dot(xt, at, acc)
        else:  # float32, or the interpreter (triton_util's docstring)
            acc = tl.dot(xt.to(tl.float32), at.to(tl.float32), acc, input_precision="ieee")
    out = v_ptr + rows[:, None].to(tl.int64) * stride_v + j[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc, mask=row_ok[:, None] & j_ok[None, :])
    else:
        tl.atomic_add(out, acc, mask=row_ok[:, None] & j_ok[None, :])


@triton.jit
def _expand_kernel(
    y_ptr,  # [T, out_total] model dtype, row stride stride_y; updated in place
    v_ptr,  # [T, max_rank] float32
    pool_ptr,  # [N] model dtype
    row_addr_ptr,  # [R] int64
    b_row_ptr,  # [n, L, M] int64
    b_rank_ptr,  # [n, L, M] int32
    b_col_ptr,  # [n, L, M] int32
    seg_start_ptr,  # [S + 1] int32
    seg_slot_ptr,  # [S] int32
    num_segs,
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
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SEG_BLOCK: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
    NATIVE: tl.constexpr,
):
    # Which segment and which of its BLOCK_M-row tiles: the tiles of all segments in order.
    i = tl.arange(0, SEG_BLOCK)
    lo = tl.load(seg_start_ptr + i, mask=i < num_segs, other=0)
    hi = tl.load(seg_start_ptr + i + 1, mask=i < num_segs, other=0)
    tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M  # [SEG_BLOCK], 0 past num_segs
    seg = tl.sum((tl.cumsum(tiles, 0) <= tl.program_id(0)).to(tl.int32), 0)
    if seg >= num_segs:
        return
    tile = tl.program_id(0) - tl.sum(tl.where(i < seg, tiles, 0), 0)
    slot = tl.load(seg_slot_ptr + seg)
    if slot < 0:
        return
    pid_n = tl.program_id(1)
    part = (pid_n >= tiles0).to(tl.int32) + (pid_n >= tiles01).to(tl.int32)
    col = tl.where(part == 0, col0, tl.where(part == 1, col1, col2))
    width = tl.where(part == 0, width0, tl.where(part == 1, width1, width2))
    n_tile = pid_n - tl.where(part == 0, 0, tl.where(part == 1, tiles0, tiles01))
    meta = slot.to(tl.int64) * slot_stride + meta_off + part
    rank = tl.load(b_rank_ptr + meta)
    if rank == 0:
        return
    first = tl.load(b_row_ptr + meta)
    v_col = tl.load(b_col_ptr + meta)
    rows = tl.load(seg_start_ptr + seg) + tile * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    row_ok = rows < tl.load(seg_start_ptr + seg + 1)
    n = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] columns of the part
    n_ok = n < width
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j0 in range(0, rank, BLOCK_R):
        j = j0 + tl.arange(0, BLOCK_R)  # [BLOCK_R]
        j_ok = j < rank
        vt = tl.load(
            v_ptr + rows[:, None].to(tl.int64) * stride_v + v_col + j[None, :],
            mask=row_ok[:, None] & j_ok[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_R] float32
        addr = tl.multiple_of(tl.load(row_addr_ptr + first + j, mask=j_ok, other=0), ROW_ALIGN)
        bt = tl.load(
            pool_ptr + addr[:, None] + n[None, :], mask=j_ok[:, None] & n_ok[None, :], other=0.0
        )  # [BLOCK_R, BLOCK_N]
        if NATIVE:  # v rounded to the model dtype for the tensor cores
            acc = tl.dot(vt.to(bt.dtype), bt, acc)
        else:  # float32, or the interpreter (triton_util's docstring)
            acc = tl.dot(vt, bt.to(tl.float32), acc, input_precision="ieee")
    ys = y_ptr + rows[:, None].to(tl.int64) * stride_y + col + n[None, :]
    ok = row_ok[:, None] & n_ok[None, :]
    y = tl.load(ys, mask=ok, other=0.0).to(tl.float32)
    tl.store(ys, (y + acc).to(y_ptr.dtype.element_ty), mask=ok)


def sgmv_shrink(
    x: torch.Tensor,  # [T, in_g]
    meta: LoraStepMeta,
    layer: int,
    group: int,
    *,
    row_align: int = 1,
    tiles: SgmvTiles | None = None,
) -> torch.Tensor:  # [T, max_rank] float32
    """v = x · Aᵀ per segment's adapter (module docstring); zero where no row contributes.

    row_align: a promise that every row_addr is a multiple of it (elements), so the kernel
    may load A's rows in vectors; docs/memory.md's geometry gives gcd(E, row widths).
    """
    check_tensor("x", x, dtype=FLOAT_DTYPES, ndim=2, inner_contiguous=True)
    _check_common(x, meta, layer, group)
    check_row_align(row_align, [x.shape[1]], meta.pool)
    tokens, in_features = x.shape
    v = torch.zeros(tokens, meta.max_rank, dtype=torch.float32, device=x.device)
    segs = meta.seg_slot.shape[0]
    if tokens == 0 or segs == 0 or meta.max_rank == 0:
        return v
    t = tiles or sgmv_tiles(tokens, segs, in_features, meta.max_rank, x.device)
    k_chunk = triton.cdiv(triton.cdiv(in_features, t.split_k), t.block_k) * t.block_k
    grid = (triton.cdiv(tokens, t.block_m) + segs, triton.cdiv(meta.max_rank, t.block_r), t.split_k)
    num_layers, num_groups = meta.a_row.shape[1], meta.a_row.shape[2]
    _shrink_kernel[grid](
        x, v, meta.pool, meta.row_addr, meta.a_row, meta.a_rank, meta.seg_start, meta.seg_slot,
        segs, in_features, k_chunk, num_layers * num_groups, layer * num_groups + group,
        x.stride(0), v.stride(0),
        BLOCK_M=t.block_m, BLOCK_R=t.block_r, BLOCK_K=t.block_k, SEG_BLOCK=pow2_at_least(segs, 2),
        SPLIT_K=t.split_k, ROW_ALIGN=row_align, NATIVE=native_dot(x.dtype, x.device),
    )  # fmt: skip
    return v


def sgmv_expand(
    y: torch.Tensor,  # [T, out_total], updated in place
    v: torch.Tensor,  # [T, max_rank] float32 (sgmv_shrink's output)
    meta: LoraStepMeta,
    layer: int,
    group: int,
    out_cols: Sequence[tuple[int, int]],  # per projection of the group: (first column, width)
    *,
    row_align: int = 1,
    tiles: SgmvTiles | None = None,
) -> None:
    """y[t, c_p + o] += v[t, b_col + j] · B_m[j, o] per segment's adapter, every part at once.

    Rows of base-model segments, and parts whose projection the slot does not target, are
    left bit-identical. The widths in out_cols must be the B rows' widths in the pool.
    """
    check_tensor("y", y, dtype=FLOAT_DTYPES, ndim=2, inner_contiguous=True)
    _check_common(y, meta, layer, group)
    check_tensor("v", v, dtype=torch.float32, device=y.device, ndim=2, inner_contiguous=True)
    if v.shape[0] != y.shape[0] or v.shape[1] < meta.max_rank:
        raise ValueError(f"v: shape {tuple(v.shape)}, expected [{y.shape[0]}, ≥ {meta.max_rank}]")
    parts = check_out_cols(out_cols, group, y.shape[1])
    check_row_align(row_align, [w for _, w in parts], meta.pool)
    tokens, segs = y.shape[0], meta.seg_slot.shape[0]
    if tokens == 0 or segs == 0 or meta.max_rank == 0:
        return
    t = tiles or sgmv_tiles(tokens, segs, 0, meta.max_rank, y.device)
    col_tiles = [triton.cdiv(w, t.block_n) for _, w in parts]
    padded = list(parts) + [(0, 0)] * (3 - len(parts))
    num_layers, num_proj = meta.b_row.shape[1], meta.b_row.shape[2]
    grid = (triton.cdiv(tokens, t.block_m) + segs, sum(col_tiles))
    _expand_kernel[grid](
        y, v, meta.pool, meta.row_addr, meta.b_row, meta.b_rank, meta.b_col,
        meta.seg_start, meta.seg_slot, segs,
        num_layers * num_proj, layer * num_proj + GROUP_PROJECTIONS[group][0],
        padded[0][0], padded[0][1], padded[1][0], padded[1][1], padded[2][0], padded[2][1],
        col_tiles[0], sum(col_tiles[:2]), y.stride(0), v.stride(0),
        BLOCK_M=t.block_m, BLOCK_R=t.block_r, BLOCK_N=t.block_n, SEG_BLOCK=pow2_at_least(segs, 2),
        ROW_ALIGN=row_align, NATIVE=native_dot(y.dtype, y.device), num_warps=t.expand_warps,
    )  # fmt: skip


def _check_common(t: torch.Tensor, meta: LoraStepMeta, layer: int, group: int) -> None:
    """Meta on t's device, the pool in t's dtype, and a kernel that can read t's device."""
    check_meta(meta, t.device, layer, group)
    if meta.pool.dtype != t.dtype:
        raise ValueError(f"meta.pool: dtype {meta.pool.dtype}, expected {t.dtype} (the model's)")
    check_launchable(_shrink_kernel, t.device)
