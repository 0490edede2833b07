"""Draft-model proposals: a small causal LM sharing the tokenizer runs γ passes ahead.

The draft is run by the same code as the target (a ModelRunner over its own paged KV
cache, cut from the same page pool); the engine injects that forward, the draft's block
manager and the token picker, so this module only keeps the draft's view of each
sequence (a shadow Sequence: the target's tokens, then the drafts fed so far).

Per step, for sequences s with depth γ_s:
    pass 1   feed what the draft has not seen (the whole context the first time, else
             the tokens accepted since), pick x_1 from the last row
    pass j   feed x_{j−1}, pick x_j                                  (j = 2 … max γ_s)
After verification accepts k drafts of γ, the draft's cache keeps the context and
x_1 … x_min(k, γ−1) (x_γ was never fed); pages past that go back to the pool.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from worker.sequence import ScheduledSeq, Sequence

# items → logits of each item's last row, [len(items), vocab], in the items' order
DraftForward = Callable[[list[ScheduledSeq]], torch.Tensor]
# (logits [S, vocab], target sequences, draw index of each) → (tokens [S], q [S, vocab] | None)
Pick = Callable[[torch.Tensor, list[Sequence], list[int]], tuple[list[int], torch.Tensor | None]]


class DraftBlocks(Protocol):
    """The draft cache's page accounting (a BlockManager over the shared pool)."""

    def can_grow(self, seq: Sequence, num_new_tokens: int) -> bool: ...
    def grow(self, seq: Sequence, num_new_tokens: int) -> None: ...
    def truncate(self, seq: Sequence, num_tokens: int) -> None: ...
    def release(self, seq: Sequence) -> None: ...


@dataclass
class Proposal:
    tokens: list[int]  # [γ'] γ' ≤ the depth asked (0 when the draft cache had no room)
    q: torch.Tensor | None  # [γ', vocab] the draft's probabilities (sampled requests)


class DraftProposer:
    def __init__(
        self,
        forward: DraftForward,
        blocks: DraftBlocks,
        pick: Pick,
        with_adapters: bool = False,  # the draft runs each sequence's adapter (self-drafting)
    ) -> None:
        self.forward = forward
        self.blocks = blocks
        self.pick = pick
        self.with_adapters = with_adapters
        self.shadows: dict[str, Sequence] = {}

    def propose(self, work: list[tuple[Sequence, int]]) -> list[Proposal]:
        """Up to `depth` draft tokens for each (sequence, depth), all sequences batched."""
        out = [Proposal([], None) for _ in work]
        qs: list[list[torch.Tensor]] = [[] for _ in work]
        items: dict[int, ScheduledSeq] = {}
        for i, (seq, depth) in enumerate(work):
            shadow = self._shadow(seq)
            fresh = shadow.num_tokens - shadow.num_computed
            if depth > 0 and self.blocks.can_grow(shadow, fresh + depth - 1):
                self.blocks.grow(shadow, fresh)
                items[i] = ScheduledSeq(shadow, fresh)
        while items:
            order = list(items)
            logits = self.forward([items[i] for i in order])  # [len(order), vocab]
            for i in order:
                items[i].seq.num_computed += items[i].num_tokens
            seqs = [work[i][0] for i in order]
            index = [
                len(s.output_ids) + len(out[i].tokens) for s, i in zip(seqs, order, strict=True)
            ]
            tokens, q = self.pick(logits, seqs, index)
            for row, (i, token) in enumerate(zip(order, tokens, strict=True)):
                out[i].tokens.append(token)
                if q is not None:
                    qs[i].append(q[row])
                if len(out[i].tokens) < work[i][1]:
                    shadow = items[i].seq
                    shadow.output_ids.append(token)
                    self.blocks.grow(shadow, 1)
                    items[i] = ScheduledSeq(shadow, 1)
                else:
                    del items[i]
        for proposal, rows in zip(out, qs, strict=True):
            proposal.q = torch.stack(rows) if rows else None
        return out

    def rollback(self, seq: Sequence, accepted: int) -> None:
        """Keep the draft's K/V of the context and the first `accepted` drafts it was fed."""
        shadow = self.shadows.get(seq.request_id)
        if shadow is not None and shadow.num_computed:
            keep = len(shadow.prompt_ids) + min(accepted, len(shadow.output_ids))
            self.blocks.truncate(shadow, min(keep, shadow.num_computed))

    def forget(self, request_id: str) -> None:
        shadow = self.shadows.pop(request_id, None)
        if shadow is not None:
            self.blocks.release(shadow)

    def reclaim(self, enough: Callable[[], bool]) -> None:
        """Drop draft caches, largest first, until enough() (they are recomputed on use)."""
        for shadow in sorted(self.shadows.values(), key=lambda s: -len(s.block_table)):
            if enough():
                return
            self.blocks.release(shadow)

    def pages(self) -> int:
        return sum(len(s.block_table) for s in self.shadows.values())

    def _shadow(self, seq: Sequence) -> Sequence:
        """The draft's copy of seq, its tokens brought up to date (drafts cleared)."""
        shadow = self.shadows.get(seq.request_id)
        if shadow is None:
            adapter = seq.adapter_id if self.with_adapters else None
            shadow = Sequence(f"{seq.request_id}/draft", [], seq.sampling, adapter, seq.arrival)
            self.shadows[seq.request_id] = shadow
        shadow.prompt_ids = seq.token_ids
        shadow.output_ids = []
        return shadow
