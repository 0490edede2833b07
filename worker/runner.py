"""Turn a scheduled batch into a ForwardBatch, run the model, return next-token logits.

Decodes (one new token) come first and attend as one group; verifications (a decode's
token and its draft) and first prefill chunks follow, those of equal query length as one
group (a first chunk's context is its query: nothing is padded); every later prefill
chunk comes last and attends alone, so every group is a contiguous slice of token rows
and no sequence is padded to another's query length. Within each part, sequences are ordered by
adapter so tokens sharing an adapter form segments (SGMV). Everything per step is built
here, once: the kernel path gets device int32/int64 tensors (LoraStepMeta, block tables, cu_seqlens),
the CPU path views of the adapters' pages for long segments and the same LoraStepMeta for
its C kernel's short ones (without it, one-row segments go to per-layout gathers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from worker.decode_graphs import DecodeGraphs
from worker.kernels.lora_cpu import CpuLora
from worker.kernels.lora_gather import GatherBucket
from worker.kernels.lora_meta import LoraStepMeta
from worker.kernels.lora_ref import Segments
from worker.lora.resident import GatherTables, ModelShape, ResidentAdapter
from worker.model.forward_batch import AttentionGroup, ForwardBatch, LoraBatch, PagedAttention
from worker.model.llama import LlamaModel
from worker.sequence import ScheduledSeq

# Segments up to this many rows run in the CPU's C kernel (a matrix-vector product per row,
# the adapter read from cache after the first); longer ones as GEMMs on views of the pool.
# Measured on bench/engine.py's 42-token prompts: the kernel's prefill as fast as the GEMMs
# with float32 adapters, 0.1-0.3 s faster with bfloat16 ones (the GEMMs widen each matrix).
KERNEL_SEGMENT_ROWS = 64


class ModelRunner:
    def __init__(
        self,
        model: LlamaModel,
        kv_rows: torch.Tensor,
        pool_flat: torch.Tensor,
        page_tokens: int,
        shape: ModelShape,
        cpu_lora: CpuLora | None = None,  # the CPU's C kernel for short segments
    ) -> None:
        self.model = model
        self.cpu_lora = cpu_lora
        self.kv = kv_rows  # [pages · L · 2 · page_tokens, kv_size]: the pool as KV rows
        self.pool_flat = pool_flat  # [N] the same buffer, flat (adapter rows)
        self.page_tokens = page_tokens
        self.page_rows = model.config.num_layers * 2 * page_tokens  # KV rows per page
        self.paged = model.device.type == "cuda"  # kernels read tensors; the CPU path views
        self.shape = shape
        self.table = pool_flat.view(-1, shape.granule)  # the pool as γ-wide rows (CPU path)
        self._last_tables: SlotTables | None = None  # the previous step's, reused when it fits
        self.graphs: DecodeGraphs | None = None  # decode steps from CUDA graphs (the engine's)

    def run(
        self, batch: list[ScheduledSeq], adapter_of: Callable[[str], ResidentAdapter]
    ) -> tuple[list[ScheduledSeq], torch.Tensor]:
        """Returns the batch in model order and logits [N, vocab] for its sampling rows."""
        ordered = sorted(batch, key=_model_order)
        forward = self.prepare(ordered, adapter_of)
        logits = None if self.graphs is None else self.graphs.run(forward)
        return ordered, self.model.forward(forward, self.kv) if logits is None else logits

    def prepare(
        self, batch: list[ScheduledSeq], adapter_of: Callable[[str], ResidentAdapter]
    ) -> ForwardBatch:
        device = self.model.device
        ids: list[int] = []
        positions: list[int] = []
        row_slots: list[int] = []  # adapter slot per token row (-1: none)
        slots: dict[str, int] = {}
        logits_index: list[int] = []
        for item in batch:
            seq, start = item.seq, item.seq.num_computed
            ids.extend(item.input_ids)
            positions.extend(range(start, start + item.num_tokens))
            aid = seq.adapter_id
            slot = -1 if aid is None else slots.setdefault(aid, len(slots))
            row_slots.extend([slot] * item.num_tokens)
            logits_index.extend(len(ids) - item.num_logits + i for i in range(item.num_logits))
        lora = self._lora(row_slots, [adapter_of(a) for a in slots]) if slots else None
        return ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.long, device=device),
            positions=torch.tensor(positions, dtype=torch.long, device=device),
            slot_rows=torch.tensor(
                self._slot_rows(batch, positions), dtype=torch.long, device=device
            ),
            kv_layer_rows=2 * self.page_tokens,
            kv_v_rows=self.page_tokens,
            attention=[] if self.paged else self._groups(batch, device),
            paged=self._paged_attention(batch, device) if self.paged else None,
            logits_index=torch.tensor(logits_index, dtype=torch.long, device=device),
            lora=lora,
        )

    def _slot_rows(self, batch: list[ScheduledSeq], positions: list[int]) -> list[int]:
        """Layer-0 K row of every new token: page · rows per page + position % page_tokens
        (plain ints: a decode step has one per sequence, and small tensors cost more)."""
        page_tokens, page_rows, rows, at = self.page_tokens, self.page_rows, [], 0
        for item in batch:
            table, end = item.seq.block_table, at + item.num_tokens
            rows += [
                table[p // page_tokens] * page_rows + p % page_tokens for p in positions[at:end]
            ]
            at = end
        return rows

    def _lora(self, row_slots: list[int], residents: list[ResidentAdapter]) -> LoraBatch:
        segments = Segments.from_rows(row_slots)
        adapters: list[ResidentAdapter | None] = [
            None if s < 0 else residents[s] for s in segments.slots
        ]
        if self.paged:
            align = min(self.shape.granule & -self.shape.granule, 16)  # a power of two
            meta = _step_meta(self.pool_flat, self._tables(residents), segments, row_slots, align)
            one_row = all(e - s == 1 for s, e in zip(segments.starts, segments.ends, strict=True))
            out_cols = self.shape.out_cols
            return LoraBatch(segments, adapters, meta, out_cols=out_cols, decode_only=one_row)
        if self.cpu_lora is not None:
            return self._cpu_kernel_batch(segments, adapters, residents, self.cpu_lora)
        buckets = _buckets(segments, adapters, self.model.device)
        return LoraBatch(segments, adapters, None, buckets, self.table, self.shape.out_cols)

    def _tables(self, residents: list[ResidentAdapter]) -> SlotTables:
        if self._last_tables is None or not self._last_tables.serves(residents):
            self._last_tables = slot_tables(residents)
        return self._last_tables

    def _cpu_kernel_batch(
        self,
        segments: Segments,
        adapters: list[ResidentAdapter | None],
        residents: list[ResidentAdapter],
        kernel: CpuLora,
    ) -> LoraBatch:
        """Short segments (decodes, verifications, short prompts) to the C kernel, taken
        out of `adapters` in place; longer ones stay on the views, one GEMM each (BLAS's
        blocking wins as prompts grow)."""
        kernel_slots = [-1] * (segments.ends[-1] if segments.ends else 0)
        for i, (start, end) in enumerate(zip(segments.starts, segments.ends, strict=True)):
            if end - start <= KERNEL_SEGMENT_ROWS and adapters[i] is not None:
                kernel_slots[start:end] = [segments.slots[i]] * (end - start)
                adapters[i] = None
        if all(a is None for a in adapters):
            adapters = []  # no segment left for the views: the op skips them at once
        if all(s < 0 for s in kernel_slots):
            return LoraBatch(segments, adapters, None, out_cols=self.shape.out_cols)
        meta = _step_meta(self.pool_flat, self._tables(residents), segments, kernel_slots, 1)
        step = kernel.step(meta, meta.row_slot, self.shape.out_cols)
        return LoraBatch(segments, adapters, meta, out_cols=self.shape.out_cols, rows_op=step)

    def _groups(self, batch: list[ScheduledSeq], device: torch.device) -> list[AttentionGroup]:
        """One group per run of batched items of equal query length (the decodes, then each
        length of verification or first chunk), then one group per later prefill chunk: the
        order of run()."""
        groups: list[AttentionGroup] = []
        row = start = 0
        while start < len(batch):
            stop = start + 1
            if not _alone(batch[start]):
                lq = batch[start].num_tokens
                while (
                    stop < len(batch) and not _alone(batch[stop]) and batch[stop].num_tokens == lq
                ):
                    stop += 1
            items = batch[start:stop]
            rows = sum(item.num_tokens for item in items)
            groups.append(self._group(items, slice(row, row + rows), device))
            row, start = row + rows, stop
        return groups

    def _group(
        self, items: list[ScheduledSeq], rows: slice, device: torch.device
    ) -> AttentionGroup:
        """Attention inputs for sequences with equal query length Lq."""
        lq = (rows.stop - rows.start) // len(items)
        ctx_lens = torch.tensor([i.seq.num_computed + i.num_tokens for i in items])
        lk = int(ctx_lens.max())
        table = _block_tables(items, torch.long)
        ctx = torch.arange(lk)
        ctx_rows = table[:, ctx // self.page_tokens] * self.page_rows + ctx % self.page_tokens
        # Query j of sequence b sits at position ctx_len_b - Lq + j and sees ctx <= that.
        q_pos = ctx_lens[:, None] - lq + torch.arange(lq)[None, :]  # [B, Lq]
        mask = ctx[None, None, :] <= q_pos[:, :, None]  # [B, Lq, Lk]
        window = self.model.config.sliding_window
        if window is not None:  # and sees only the latest `window` positions
            mask &= ctx[None, None, :] > q_pos[:, :, None] - window
        return AttentionGroup(
            rows=rows,
            num_seqs=len(items),
            ctx_rows=ctx_rows.to(device),
            mask=mask.unsqueeze(1).to(device),
        )

    def _paged_attention(self, batch: list[ScheduledSeq], device: torch.device) -> PagedAttention:
        q_lens = [item.num_tokens for item in batch]
        cu = torch.tensor([0, *q_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        ctx = [item.seq.num_computed + item.num_tokens for item in batch]
        return PagedAttention(
            block_tables=_block_tables(batch, torch.int32).to(device),
            context_lens=torch.tensor(ctx, dtype=torch.int32, device=device),
            cu_seqlens_q=cu.to(device),
            max_query_len=max(q_lens),
            decode_only=max(q_lens) == 1,
            num_layers=self.model.config.num_layers,
            window=self.model.config.sliding_window,
        )


def _buckets(
    segments: Segments, adapters: list[ResidentAdapter | None], device: torch.device
) -> list[GatherBucket]:
    """One-row segments grouped by adapter layout (taken out of `adapters`, in place)."""
    by_layout: dict[tuple[tuple[int, ...], ...], list[tuple[int, GatherTables]]] = {}
    for i, (start, end) in enumerate(zip(segments.starts, segments.ends, strict=True)):
        adapter = adapters[i]
        tables = adapter.gather() if end - start == 1 and adapter is not None else None
        if tables is not None:
            by_layout.setdefault(tables.signature, []).append((start, tables))
            adapters[i] = None
    return [_bucket(members, device) for members in by_layout.values()]


def _bucket(members: list[tuple[int, GatherTables]], device: torch.device) -> GatherBucket:
    first = members[0][1]

    def stacked(pick: Callable[[GatherTables], tuple[torch.Tensor | None, ...]]) -> tuple:
        per_key = zip(*(pick(g) for _, g in members), strict=True)
        return tuple(None if ts[0] is None else torch.stack(ts) for ts in per_key)

    return GatherBucket(
        rows=torch.tensor([row for row, _ in members], dtype=torch.long, device=device),
        a_index=stacked(lambda g: g.a_index),
        a_offsets=first.a_offsets,
        a_rank=first.a_rank,
        b_index=stacked(lambda g: g.b_index),
        b_offsets=first.b_offsets,
        b_rank=first.b_rank,
        b_col=first.b_col,
    )


def _alone(item: ScheduledSeq) -> bool:
    """A prefill chunk past the start of its prompt attends alone (its context is its own);
    decodes, verifications and first chunks batch with items of equal query length."""
    return item.num_tokens - len(item.draft) > 1 and item.seq.num_computed > 0


def _model_order(item: ScheduledSeq) -> tuple[bool, int, str, int]:
    """Batched items by query length (decodes first), then prefill chunks; by adapter within."""
    alone = _alone(item)
    return alone, 0 if alone else item.num_tokens, item.seq.adapter_id or "", item.seq.arrival


def _block_tables(items: list[ScheduledSeq], dtype: torch.dtype) -> torch.Tensor:
    """[B, max_blocks] page ids, padded with page 0 (never read past a context length)."""
    width = max(len(i.seq.block_table) for i in items)
    pad = [0] * width
    return torch.tensor(
        [i.seq.block_table + pad[len(i.seq.block_table) :] for i in items], dtype=dtype
    )


@dataclass(frozen=True)
class SlotTables:
    """The slots' row tables, concatenated and rebased (LoraStepMeta's per-adapter part).

    A decode-heavy batch runs the same adapters step after step, so the runner keeps the
    last one and reuses it while the residents are the same objects (a re-paged adapter
    is a new object, so stale addresses are never reused)."""

    residents: tuple[ResidentAdapter, ...]
    row_addr: torch.Tensor
    a_row: torch.Tensor
    a_rank: torch.Tensor
    b_row: torch.Tensor
    b_rank: torch.Tensor
    b_col: torch.Tensor
    max_rank: int

    def serves(self, residents: list[ResidentAdapter]) -> bool:
        return len(residents) == len(self.residents) and all(
            a is b for a, b in zip(residents, self.residents, strict=True)
        )


def slot_tables(residents: list[ResidentAdapter]) -> SlotTables:
    bases = [0]
    for r in residents[:-1]:
        bases.append(bases[-1] + int(r.rows.numel()))

    def rebased(index: torch.Tensor, base: int) -> torch.Tensor:
        return torch.where(index >= 0, index + base, index)

    return SlotTables(
        residents=tuple(residents),
        row_addr=torch.cat([r.rows for r in residents]),
        a_row=torch.stack([rebased(r.a_row, b) for r, b in zip(residents, bases, strict=True)]),
        a_rank=torch.stack([r.a_rank for r in residents]),
        b_row=torch.stack([rebased(r.b_row, b) for r, b in zip(residents, bases, strict=True)]),
        b_rank=torch.stack([r.b_rank for r in residents]),
        b_col=torch.stack([r.b_col for r in residents]),
        max_rank=max(r.max_group_rank for r in residents),
    )


def _step_meta(
    pool_flat: torch.Tensor,
    tables: SlotTables,
    segments: Segments,
    row_slots: list[int],
    row_align: int,
) -> LoraStepMeta:
    """The slots' row tables with this step's segments as device tensors."""
    device = pool_flat.device
    starts = [*segments.starts, segments.ends[-1] if segments.ends else 0]
    return LoraStepMeta(
        pool=pool_flat,
        row_addr=tables.row_addr,
        a_row=tables.a_row,
        a_rank=tables.a_rank,
        b_row=tables.b_row,
        b_rank=tables.b_rank,
        b_col=tables.b_col,
        seg_start=torch.tensor(starts, dtype=torch.int32, device=device),
        seg_slot=torch.tensor(segments.slots, dtype=torch.int32, device=device),
        row_slot=torch.tensor(row_slots, dtype=torch.int32, device=device),
        max_rank=tables.max_rank,
        row_align=row_align,
    )
