"""Turn a scheduled batch into a ForwardBatch, run the model, return next-token logits.

Decodes (one new token) come first and attend as one group; each prefill chunk
follows and attends alone, so every group is a contiguous slice of token rows and
no sequence is padded to another's query length. Within each part, sequences are
ordered by adapter so that tokens sharing an adapter form segments (SGMV).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from worker.kernels.lora_ref import Segments
from worker.model.forward_batch import AttentionGroup, ForwardBatch, LoraBatch, LoraWeights
from worker.model.llama import KVCache, LlamaModel
from worker.sequence import ScheduledSeq


class ModelRunner:
    def __init__(self, model: LlamaModel, kv: KVCache, page_size: int) -> None:
        self.model = model
        self.kv = kv
        self.page_size = page_size

    def run(
        self,
        batch: list[ScheduledSeq],
        adapter_of: Callable[[str], LoraWeights],
    ) -> tuple[list[ScheduledSeq], torch.Tensor]:
        """Returns the batch in model order and logits [N, vocab] for its sampling rows."""
        ordered = sorted(
            batch, key=lambda s: (s.num_tokens > 1, s.seq.adapter_id or "", s.seq.arrival)
        )
        forward = self.prepare(ordered, adapter_of)
        logits = self.model.forward(forward, self.kv)
        return ordered, logits

    def prepare(
        self, batch: list[ScheduledSeq], adapter_of: Callable[[str], LoraWeights]
    ) -> ForwardBatch:
        device = self.model.device
        ids: list[int] = []
        positions: list[int] = []
        row_slots: list[int] = []  # adapter index per token row (-1: none)
        adapters: dict[str, int] = {}
        logits_index: list[int] = []
        for item in batch:
            seq, start = item.seq, item.seq.num_computed
            ids.extend(seq.token_ids[start : start + item.num_tokens])
            positions.extend(range(start, start + item.num_tokens))
            slot = (
                -1 if seq.adapter_id is None else adapters.setdefault(seq.adapter_id, len(adapters))
            )
            row_slots.extend([slot] * item.num_tokens)
            if item.samples:
                logits_index.append(len(ids) - 1)
        pos = torch.tensor(positions, dtype=torch.long)
        tables = [item.seq.block_table for item in batch]
        lora = None
        if adapters:
            by_slot = [adapter_of(a) for a in adapters]
            segments = Segments.from_rows(row_slots)
            lora = LoraBatch(segments, [None if s < 0 else by_slot[s] for s in segments.slots])
        return ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.long, device=device),
            positions=pos.to(device),
            slot_mapping=self._slots(tables, [i.num_tokens for i in batch], pos).to(device),
            attention=self._groups(batch, device),
            logits_index=torch.tensor(logits_index, dtype=torch.long, device=device),
            lora=lora,
        )

    def _slots(self, tables: list[list[int]], counts: list[int], pos: torch.Tensor) -> torch.Tensor:
        """KV slot of every new token: page_id · page_size + position % page_size."""
        page_of_row = torch.cat(
            [
                torch.tensor(table, dtype=torch.long)[chunk // self.page_size]
                for table, chunk in zip(tables, pos.split(counts), strict=True)
            ]
        )
        return page_of_row * self.page_size + pos % self.page_size

    def _groups(self, batch: list[ScheduledSeq], device: torch.device) -> list[AttentionGroup]:
        """Decodes (first in the batch) as one group, then one group per prefill chunk."""
        decodes = [item for item in batch if item.num_tokens == 1]
        groups = [self._group(decodes, slice(0, len(decodes)), device)] if decodes else []
        row = len(decodes)
        for item in batch[len(decodes) :]:
            groups.append(self._group([item], slice(row, row + item.num_tokens), device))
            row += item.num_tokens
        return groups

    def _group(
        self, items: list[ScheduledSeq], rows: slice, device: torch.device
    ) -> AttentionGroup:
        """Attention inputs for sequences with equal query length Lq."""
        lq = (rows.stop - rows.start) // len(items)
        ctx_lens = torch.tensor([i.seq.num_computed + i.num_tokens for i in items])
        lk = int(ctx_lens.max())
        pages = max(len(i.seq.block_table) for i in items)
        table = torch.zeros(len(items), pages, dtype=torch.long)
        for b, item in enumerate(items):
            table[b, : len(item.seq.block_table)] = torch.tensor(item.seq.block_table)
        ctx = torch.arange(lk)
        ctx_slots = table[:, ctx // self.page_size] * self.page_size + ctx % self.page_size
        # Query j of sequence b sits at position ctx_len_b - Lq + j and sees ctx <= that.
        q_pos = ctx_lens[:, None] - lq + torch.arange(lq)[None, :]  # [B, Lq]
        mask = ctx[None, None, :] <= q_pos[:, :, None]  # [B, Lq, Lk]
        window = self.model.config.sliding_window
        if window is not None:  # and sees only the latest `window` positions
            mask &= ctx[None, None, :] > q_pos[:, :, None] - window
        return AttentionGroup(
            rows=rows,
            num_seqs=len(items),
            ctx_slots=ctx_slots.to(device),
            mask=mask.unsqueeze(1).to(device),
        )
