"""One dispatch table: which implementation of each op the model runs on a device.

The model calls `ops.lora`, `ops.write_kv` and `ops.attention` and does not change
between implementations. The CPU runs the torch reference (LoRA over views of the page
pool, SDPA over gathered pages); CUDA runs the Triton kernels over the same pool.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from worker.kernels import attention_ref, lora_gather, lora_ref
from worker.kernels.lora_meta import GROUP_PROJECTIONS, GROUPS
from worker.model.forward_batch import AttentionGroup, ForwardBatch, LoraBatch

LoraOp = Callable[[torch.Tensor, torch.Tensor, LoraBatch, int, int], None]
WriteKV = Callable[[torch.Tensor, int, torch.Tensor, torch.Tensor, ForwardBatch], None]
AttentionOp = Callable[[torch.Tensor, torch.Tensor, int, ForwardBatch], torch.Tensor]


@dataclass(frozen=True)
class Ops:
    lora: LoraOp  # (x [T, in], y [T, out] += LoRA, batch, layer, group index)
    write_kv: WriteKV  # (kv rows, layer, k [T, n_kv, d], v [T, n_kv, d], batch)
    attention: AttentionOp  # (q [T, n_heads, d], kv, layer, batch) -> [T, n_heads, d]


def lora_reference(
    x: torch.Tensor,  # [T, in]
    y: torch.Tensor,  # [T, fused out], updated in place
    lora: LoraBatch,
    layer: int,
    group: int,
) -> None:
    """y[seg] += (x[seg] @ A_sᵀ) @ B_s for each segment's adapter, on views of the pool;
    short segments run in the C kernel (lora_cpu) where it was built; without it, one-row
    segments are bucketed by adapter layout through gathered products (lora_gather)."""
    if lora.adapters:  # empty when the C kernel takes every segment
        fused = [None if w is None else w.fused(layer, GROUPS[group]) for w in lora.adapters]
        if any(f is not None for f in fused):
            a = [None if f is None else f.a for f in fused]
            v = lora_ref.sgmv_shrink(x, lora.segments, a, [1.0] * len(fused))
            parts = [() if f is None else f.parts for f in fused]
            lora_ref.sgmv_expand(y, v, lora.segments, parts)
    if lora.rows_op is not None:
        lora.rows_op.apply(x, y, layer, group)
    if lora.buckets and lora.table is not None:
        projections, out_cols = GROUP_PROJECTIONS[group], lora.out_cols[group]
        for bucket in lora.buckets:
            lora_gather.apply(lora.table, x, y, bucket, layer, group, projections, out_cols)


def write_kv_reference(
    kv: torch.Tensor,  # [pool rows, kv_size]
    layer: int,
    k: torch.Tensor,  # [T, n_kv, d]
    v: torch.Tensor,  # [T, n_kv, d]
    batch: ForwardBatch,
) -> None:
    k_rows = batch.slot_rows + layer * batch.kv_layer_rows
    attention_ref.write_kv(kv, k, v, k_rows, k_rows + batch.kv_v_rows)


def attention_reference(
    q: torch.Tensor,  # [T, n_heads, d]
    kv: torch.Tensor,  # [pool rows, kv_size]
    layer: int,
    batch: ForwardBatch,
) -> torch.Tensor:  # [T, n_heads, d]
    groups, first = batch.attention, layer * batch.kv_layer_rows
    if len(groups) == 1:  # the whole batch attends as one group (e.g. all decodes)
        return _group_attention(q, kv, first, batch.kv_v_rows, groups[0])
    out = torch.empty_like(q)
    for group in groups:
        out[group.rows] = _group_attention(q[group.rows], kv, first, batch.kv_v_rows, group)
    return out


def _group_attention(
    q: torch.Tensor,  # [B · Lq, n_heads, d]
    kv: torch.Tensor,  # [pool rows, kv_size]
    first: int,  # this layer's K rows start `first` rows past layer 0's
    v_rows: int,  # a V row is this far past its K row
    group: AttentionGroup,
) -> torch.Tensor:  # [B · Lq, n_heads, d]
    b = group.num_seqs
    queries = q.view(b, q.shape[0] // b, *q.shape[1:])
    k_rows = group.ctx_rows + first
    out = attention_ref.paged_attention(queries, kv, k_rows, k_rows + v_rows, group.mask)
    return out.flatten(0, 1)


def _triton() -> Ops:
    from worker.model.ops_triton import attention_triton, lora_triton

    return Ops(lora_triton, write_kv_reference, attention_triton)


REFERENCE = Ops(lora_reference, write_kv_reference, attention_reference)
# device type → its ops (built on first use: Triton is imported only where CUDA runs)
OPS: dict[str, Callable[[], Ops]] = {"cpu": lambda: REFERENCE, "cuda": _triton}


def ops_for(device: torch.device) -> Ops:
    """The table's entry for the device type (the reference where no kernel is registered)."""
    return OPS.get(device.type, lambda: REFERENCE)()
