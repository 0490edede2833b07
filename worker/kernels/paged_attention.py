"""Attention over the paged KV cache (Triton): flash-decoding and varlen prefill.

The cache is the page pool's KV view, kv [P, L, 2, page_tokens, n_kv, d] (K = kv[:, l, 0],
V = kv[:, l, 1]); context position c of sequence b lives in page block_tables[b, c // pt]
at offset c % pt. Sequence b has context_lens[b] positions (its new tokens included, their
K/V already written) and q_len_b = cu_seqlens_q[b+1] − cu_seqlens_q[b] queries; query j
sits at position p = context_lens[b] − q_len_b + j. With g = n_heads / n_kv, scale = 1/√d
and an optional sliding window w:

    out[t, h] = Σ_{c ∈ C(p)} softmax_c(scale · q[t, h] · K[c, h // g]) · V[c, h // g]
    C(p) = { c : c ≤ p  and  c > p − w }              (no lower bound without a window)

Shapes: q [T, n_heads, d], out [T, n_heads, d] in q's dtype; a sequence with no context
position (context_lens 0, e.g. a padded decode row) gets zeros.

Decode (one query per sequence) splits each context into partitions of `partition`
positions, one program per (sequence, kv head, partition) computing all g query heads of
the kv head at once (K and V read once per group); a second kernel combines the partitions
by their log-sum-exp. Varlen (prefill, chunked prefill, verification) runs one program per
(BLOCK_M queries of one sequence, query head) with an online softmax over BLOCK_N-position
blocks of the pages, driven by cu_seqlens_q: no dense mask is built. Scores and softmax
are float32; P·V runs in the model dtype on the tensor cores (float32 elsewhere).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from worker.kernels.checks import FLOAT_DTYPES, check_shape, check_tensor
from worker.kernels.triton_util import check_launchable, native_dot, pow2_at_least, sm_count

NO_WINDOW = 1 << 30  # a window no context reaches
LOG2E = 1.4426950408889634


@triton.jit
def _decode_kernel(
    q_ptr,  # [B, n_heads, d]
    kv_ptr,  # [P, L, 2, pt, n_kv, d]
    tables_ptr,  # [B, max_blocks] int32
    lens_ptr,  # [B] int32
    o_ptr,  # [B, n_heads, splits, d] float32 partials, or the output [B, n_heads, d]
    lse_ptr,  # [B, n_heads, splits] float32 log2-sum-exp (STORE_LSE)
    layer_off,  # element offset of layer l inside a page
    stride_qb,
    stride_qh,
    stride_page,
    stride_kv,  # K → V
    stride_tok,
    stride_head,
    stride_table,
    stride_ob,
    stride_oh,
    stride_os,
    num_heads,
    num_splits,
    group,  # query heads per kv head
    page_tokens,
    partition,  # context positions per split
    window,
    qk_scale,  # scale · log2(e)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    STORE_LSE: tl.constexpr,
    NATIVE: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(lens_ptr + b)
    lo = tl.maximum(split * partition, tl.maximum(ctx - window, 0))  # query at ctx − 1
    hi = tl.minimum((split + 1) * partition, ctx)
    hh = tl.arange(0, BLOCK_H)
    heads = kvh * group + hh  # [BLOCK_H] query heads of this kv head
    h_ok = hh < group
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    out = o_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + split * stride_os
    lse_at = lse_ptr + (b.to(tl.int64) * num_heads + heads) * num_splits + split
    if lo >= hi:  # nothing of this context in this split
        if STORE_LSE:
            tl.store(lse_at, tl.full((BLOCK_H,), float("-inf"), tl.float32), mask=h_ok)
        else:
            zeros = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
            tl.store(
                out + d[None, :],
                zeros.to(o_ptr.dtype.element_ty),
                mask=h_ok[:, None] & d_ok[None, :],
            )
        return
    q = tl.load(
        q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=h_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [BLOCK_H, BLOCK_D]
    m_i = tl.full((BLOCK_H,), -1e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] context positions
        p_ok = pos < hi
        page = tl.load(
            tables_ptr + b.to(tl.int64) * stride_table + pos // page_tokens, mask=p_ok, other=0
        )
        at = (
            page.to(tl.int64) * stride_page
            + layer_off
            + (pos % page_tokens) * stride_tok
            + kvh * stride_head
        )
        kv_ok = p_ok[:, None] & d_ok[None, :]
        k = tl.load(kv_ptr + at[:, None] + d[None, :], mask=kv_ok, other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(kv_ptr + at[:, None] + stride_kv + d[None, :], mask=kv_ok, other=0.0)
        if NATIVE:
            s = tl.dot(q, tl.trans(k))
        else:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        s = tl.where(p_ok[None, :], s * qk_scale, float("-inf"))  # [BLOCK_H, BLOCK_N] log2 units
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if NATIVE:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        else:
            acc = tl.dot(p, v.to(tl.float32), acc * alpha[:, None], input_precision="ieee")
        m_i = m_new
    res = acc / l_i[:, None]
    tl.store(out + d[None, :], res.to(o_ptr.dtype.element_ty), mask=h_ok[:, None] & d_ok[None, :])
    if STORE_LSE:
        tl.store(lse_at, m_i + tl.log2(l_i), mask=h_ok)


@triton.jit
def _combine_kernel(
    part_ptr,  # [B, n_heads, splits, d] float32
    lse_ptr,  # [B, n_heads, splits] float32
    out_ptr,  # [B, n_heads, d]
    stride_ob,
    stride_oh,
    num_heads,
    num_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    row = b.to(tl.int64) * num_heads + h
    s = tl.arange(0, SPLIT_BLOCK)
    d = tl.arange(0, BLOCK_D)
    lse = tl.load(lse_ptr + row * num_splits + s, mask=s < num_splits, other=float("-inf"))
    used = lse > float("-inf")  # [SPLIT_BLOCK] splits that saw context
    m = tl.max(lse, 0)
    w = tl.where(used, tl.exp2(lse - tl.where(m > float("-inf"), m, 0.0)), 0.0)
    part = tl.load(
        part_ptr + (row * num_splits + s[:, None]) * HEAD_DIM + d[None, :],
        mask=used[:, None] & (d[None, :] < HEAD_DIM),
        other=0.0,
    )  # [SPLIT_BLOCK, BLOCK_D]
    den = tl.sum(w, 0)
    res = tl.sum(w[:, None] * part, 0) / tl.where(den > 0, den, 1.0)
    tl.store(
        out_ptr + b * stride_ob + h * stride_oh + d,
        res.to(out_ptr.dtype.element_ty),
        mask=d < HEAD_DIM,
    )


@triton.jit
def _varlen_kernel(
    q_ptr,  # [T, n_heads, d]
    kv_ptr,  # [P, L, 2, pt, n_kv, d]
    tables_ptr,  # [B, max_blocks] int32
    lens_ptr,  # [B] int32
    cu_ptr,  # [B + 1] int32
    o_ptr,  # [T, n_heads, d]
    layer_off,
    stride_qt,
    stride_qh,
    stride_page,
    stride_kv,
    stride_tok,
    stride_head,
    stride_table,
    stride_ot,
    stride_oh,
    num_seqs,
    group,
    page_tokens,
    window,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SEQ_BLOCK: tl.constexpr,
    NATIVE: tl.constexpr,
):
    # Which sequence and which of its BLOCK_M-query tiles: the tiles of all sequences in order.
    i = tl.arange(0, SEQ_BLOCK)
    starts = tl.load(cu_ptr + i, mask=i < num_seqs, other=0)
    ends = tl.load(cu_ptr + i + 1, mask=i < num_seqs, other=0)
    tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M  # [SEQ_BLOCK], 0 past num_seqs
    seq = tl.sum((tl.cumsum(tiles, 0) <= tl.program_id(0)).to(tl.int32), 0)
    if seq >= num_seqs:
        return
    tile = tl.program_id(0) - tl.sum(tl.where(i < seq, tiles, 0), 0)
    h = tl.program_id(1)
    kvh = h // group
    q_lo = tl.load(cu_ptr + seq)
    q_hi = tl.load(cu_ptr + seq + 1)
    first = tl.load(lens_ptr + seq) - (q_hi - q_lo)  # position of the sequence's first query
    rows = q_lo + tile * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] token rows
    r_ok = rows < q_hi
    qpos = first + rows - q_lo  # [BLOCK_M] positions
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(
        q_ptr + rows[:, None].to(tl.int64) * stride_qt + h * stride_qh + d[None, :],
        mask=r_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [BLOCK_M, BLOCK_D]
    k_lo = tl.maximum(first + tile * BLOCK_M - window + 1, 0)
    k_hi = first + tl.minimum(q_hi - q_lo, (tile + 1) * BLOCK_M)  # causal: last query's pos + 1
    m_i = tl.full((BLOCK_M,), -1e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start in range(k_lo, k_hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] context positions
        p_ok = pos < k_hi
        page = tl.load(
            tables_ptr + seq.to(tl.int64) * stride_table + pos // page_tokens, mask=p_ok, other=0
        )
        at = (
            page.to(tl.int64) * stride_page
            + layer_off
            + (pos % page_tokens) * stride_tok
            + kvh * stride_head
        )
        kv_ok = p_ok[:, None] & d_ok[None, :]
        k = tl.load(kv_ptr + at[:, None] + d[None, :], mask=kv_ok, other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(kv_ptr + at[:, None] + stride_kv + d[None, :], mask=kv_ok, other=0.0)
        if NATIVE:
            s = tl.dot(q, tl.trans(k))
        else:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        allowed = (
            p_ok[None, :]
            & (pos[None, :] <= qpos[:, None])
            & (pos[None, :] > qpos[:, None] - window)
        )
        s = tl.where(allowed, s * qk_scale, float("-inf"))  # [BLOCK_M, BLOCK_N] log2 units
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if NATIVE:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        else:
            acc = tl.dot(p, v.to(tl.float32), acc * alpha[:, None], input_precision="ieee")
        m_i = m_new
    res = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    outs = o_ptr + rows[:, None].to(tl.int64) * stride_ot + h * stride_oh + d[None, :]
    tl.store(outs, res.to(o_ptr.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])


def paged_attention(
    q: torch.Tensor,  # [T, n_heads, d]
    kv: torch.Tensor,  # [P, L, 2, page_tokens, n_kv, d]
    layer: int,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    context_lens: torch.Tensor,  # [B] int32
    cu_seqlens_q: torch.Tensor,  # [B + 1] int32
    *,
    window: int | None = None,
    scale: float | None = None,
    out: torch.Tensor | None = None,  # [T, n_heads, d]
) -> torch.Tensor:  # [T, n_heads, d]
    """Decode when every sequence has one query (T == B, each sequence ≥ 1 query), else varlen."""
    if q.shape[0] == block_tables.shape[0]:
        return decode_attention(
            q, kv, layer, block_tables, context_lens, window=window, scale=scale, out=out
        )
    return varlen_attention(
        q, kv, layer, block_tables, context_lens, cu_seqlens_q, window=window, scale=scale, out=out
    )


def decode_attention(
    q: torch.Tensor,  # [B, n_heads, d]: one query per sequence, at position context_lens − 1
    kv: torch.Tensor,  # [P, L, 2, page_tokens, n_kv, d]
    layer: int,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    context_lens: torch.Tensor,  # [B] int32
    *,
    window: int | None = None,
    scale: float | None = None,
    out: torch.Tensor | None = None,  # [B, n_heads, d]
    partition: int | None = None,  # context positions per split (default: fill the GPU)
    block_n: int = 64,  # positions per step
) -> torch.Tensor:  # [B, n_heads, d]
    """Flash-decoding over the pages (module docstring): splits combined by log-sum-exp."""
    out = _check(q, kv, layer, block_tables, context_lens, window, out)
    batch, num_heads, head_dim = q.shape
    num_kv = kv.shape[4]
    if batch == 0:
        return out
    capacity = block_tables.shape[1] * kv.shape[3]
    part = partition or _partition(capacity, batch * num_kv, q.device)
    splits = max(1, triton.cdiv(capacity, part))
    group = num_heads // num_kv
    if splits == 1:
        partial, lse = out, out  # the one split writes the output itself (lse unused)
        o_strides = (out.stride(0), out.stride(1), 0)
    else:
        partial = torch.empty(
            batch, num_heads, splits, head_dim, dtype=torch.float32, device=q.device
        )
        lse = torch.empty(batch, num_heads, splits, dtype=torch.float32, device=q.device)
        o_strides = (partial.stride(0), partial.stride(1), partial.stride(2))
    _decode_kernel[(batch, num_kv, splits)](
        q, kv, block_tables, context_lens, partial, lse, layer * kv.stride(1),
        q.stride(0), q.stride(1), kv.stride(0), kv.stride(2), kv.stride(3), kv.stride(4),
        block_tables.stride(0), *o_strides, num_heads, splits, group, kv.shape[3], part,
        window or NO_WINDOW, (scale or 1 / math.sqrt(head_dim)) * LOG2E,
        HEAD_DIM=head_dim, BLOCK_D=pow2_at_least(head_dim, 16), BLOCK_H=pow2_at_least(group, 16),
        BLOCK_N=block_n, STORE_LSE=splits > 1, NATIVE=native_dot(q.dtype, q.device),
        num_warps=attention_warps(head_dim),
    )  # fmt: skip
    if splits > 1:
        _combine_kernel[(batch, num_heads)](
            partial, lse, out, out.stride(0), out.stride(1), num_heads, splits,
            HEAD_DIM=head_dim, BLOCK_D=pow2_at_least(head_dim, 16), SPLIT_BLOCK=pow2_at_least(splits, 2),
        )  # fmt: skip
    return out


def attention_warps(head_dim: int) -> int:
    """Warps for the decode and varlen kernels: 8 from head_dim 128, where 4 warps spill
    registers on sm_90 in bf16 (bench/kernel_compile.py reports it), else 4."""
    return 8 if head_dim >= 128 else 4


def varlen_attention(
    q: torch.Tensor,  # [T, n_heads, d]: sequence b's queries are rows cu_seqlens_q[b] .. [b+1]
    kv: torch.Tensor,  # [P, L, 2, page_tokens, n_kv, d]
    layer: int,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    context_lens: torch.Tensor,  # [B] int32
    cu_seqlens_q: torch.Tensor,  # [B + 1] int32
    *,
    window: int | None = None,
    scale: float | None = None,
    out: torch.Tensor | None = None,  # [T, n_heads, d]
    block_m: int | None = None,  # queries per program (default by the mean query length)
    block_n: int = 64,  # positions per step
) -> torch.Tensor:  # [T, n_heads, d]
    """Causal attention of each sequence's queries over its pages (module docstring)."""
    out = _check(q, kv, layer, block_tables, context_lens, window, out)
    check_tensor("cu_seqlens_q", cu_seqlens_q, dtype=torch.int32, device=q.device, contiguous=True)
    check_shape("cu_seqlens_q", cu_seqlens_q, (block_tables.shape[0] + 1,))
    tokens, num_heads, head_dim = q.shape
    seqs = block_tables.shape[0]
    if tokens == 0 or seqs == 0:
        return out
    bm = block_m or (16 if tokens <= 16 * seqs else 64)
    _varlen_kernel[(triton.cdiv(tokens, bm) + seqs, num_heads)](
        q, kv, block_tables, context_lens, cu_seqlens_q, out, layer * kv.stride(1),
        q.stride(0), q.stride(1), kv.stride(0), kv.stride(2), kv.stride(3), kv.stride(4),
        block_tables.stride(0), out.stride(0), out.stride(1), seqs, num_heads // kv.shape[4],
        kv.shape[3], window or NO_WINDOW, (scale or 1 / math.sqrt(head_dim)) * LOG2E,
        HEAD_DIM=head_dim, BLOCK_D=pow2_at_least(head_dim, 16), BLOCK_M=bm, BLOCK_N=block_n,
        SEQ_BLOCK=pow2_at_least(seqs, 2), NATIVE=native_dot(q.dtype, q.device),
        num_warps=attention_warps(head_dim),
    )  # fmt: skip
    return out


def _partition(capacity: int, programs: int, device: torch.device) -> int:
    """Positions per split: enough splits for ~2 programs per SM, at least 256 positions each."""
    want = triton.cdiv(2 * sm_count(device), max(1, programs))
    return max(256, triton.cdiv(triton.cdiv(capacity, want), 64) * 64)


def _check(
    q: torch.Tensor,
    kv: torch.Tensor,
    layer: int,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    window: int | None,
    out: torch.Tensor | None,
) -> torch.Tensor:  # out, allocated when not given
    check_tensor("q", q, dtype=FLOAT_DTYPES, ndim=3, inner_contiguous=True)
    check_tensor("kv", kv, dtype=q.dtype, device=q.device, ndim=6, inner_contiguous=True)
    check_tensor("block_tables", block_tables, dtype=torch.int32, device=q.device, ndim=2)
    check_tensor("block_tables", block_tables, inner_contiguous=True)
    check_tensor("context_lens", context_lens, dtype=torch.int32, device=q.device, contiguous=True)
    check_shape("context_lens", context_lens, (block_tables.shape[0],))
    pages, num_layers, two, _, num_kv, head_dim = kv.shape
    if two != 2:
        raise ValueError(f"kv: shape {tuple(kv.shape)}, expected [P, L, 2, page_tokens, n_kv, d]")
    if q.shape[2] != head_dim or q.shape[1] % num_kv:
        raise ValueError(
            f"q: shape {tuple(q.shape)} does not fit kv's {num_kv} kv heads of dim {head_dim}"
        )
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} out of range [0, {num_layers})")
    if window is not None and window < 1:
        raise ValueError(f"window {window} must be ≥ 1 (None: no window)")
    check_launchable(_decode_kernel, q.device)
    if out is None:
        return torch.empty_like(q, memory_format=torch.contiguous_format)
    check_tensor("out", out, dtype=q.dtype, device=q.device, inner_contiguous=True)
    check_shape("out", out, q.shape)
    return out
