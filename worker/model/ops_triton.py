"""The CUDA entries of the dispatch table: Triton SGMV/BGMV over the page pool, paged
attention over block tables (worker/kernels). Imported only where CUDA runs."""

from __future__ import annotations

import torch

from worker.kernels import bgmv, paged_attention, sgmv
from worker.model.forward_batch import ForwardBatch, LoraBatch


def lora_triton(
    x: torch.Tensor,  # [T, in]
    y: torch.Tensor,  # [T, fused out], updated in place
    lora: LoraBatch,
    layer: int,
    group: int,
) -> None:
    """v = shrink(x); y += expand(v), all segments in one launch each (decode: BGMV)."""
    meta = lora.meta
    if meta is None or meta.max_rank == 0:
        return
    cols = [(c.start, c.stop - c.start) for c in lora.out_cols[group]]
    ops = bgmv if lora.decode_only else sgmv
    shrink = bgmv.bgmv_shrink if ops is bgmv else sgmv.sgmv_shrink
    expand = bgmv.bgmv_expand if ops is bgmv else sgmv.sgmv_expand
    v = shrink(x, meta, layer, group, row_align=meta.row_align)
    expand(y, v, meta, layer, group, cols, row_align=meta.row_align)


def attention_triton(
    q: torch.Tensor,  # [T, n_heads, d]
    kv: torch.Tensor,  # [pool rows, kv_size]: the page pool as KV rows
    layer: int,
    batch: ForwardBatch,
) -> torch.Tensor:  # [T, n_heads, d]
    paged = batch.paged
    if paged is None:
        raise ValueError("the Triton attention needs the batch's block tables (runner.paged)")
    head_dim = q.shape[-1]
    kv6 = kv.view(-1, paged.num_layers, 2, batch.kv_v_rows, kv.shape[1] // head_dim, head_dim)
    return paged_attention.paged_attention(
        q,
        kv6,
        layer,
        paged.block_tables,
        paged.context_lens,
        paged.cu_seqlens_q,
        window=paged.window,
    )
