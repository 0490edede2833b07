"""Continuous batching under a token budget, with chunked prefill and preemption by recompute.

Each step: running sequences first (oldest first; a decode costs one token, an
unfinished prefill continues in a chunk), then waiting sequences in arrival order
while the token budget, the sequence limit and the page pool allow. When pages run
short the newest running sequence is preempted: its pages are freed and it waits to
recompute. The pool never overflows.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from worker.memory.block_manager import BlockManager
from worker.sequence import ScheduledSeq, SeqStatus, Sequence


@dataclass(frozen=True)
class SchedulerLimits:
    max_num_seqs: int
    max_batch_tokens: int


class Scheduler:
    def __init__(self, blocks: BlockManager, limits: SchedulerLimits) -> None:
        self.blocks = blocks
        self.limits = limits
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take seq out (finished or cancelled) and free its pages at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.limits.max_batch_tokens
        batch: list[ScheduledSeq] = []
        for seq in sorted(self.running, key=lambda s: s.arrival):
            if seq not in self.running:  # preempted while making room for an older one
                continue
            n = min(seq.num_uncomputed, budget)
            if n == 0 or not self._make_room(seq, n):
                continue
            self.blocks.grow(seq, n)
            batch.append(ScheduledSeq(seq, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.limits.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_uncomputed, budget)
            if not self.blocks.can_grow(seq, n):
                break
            self.waiting.popleft()
            self.blocks.grow(seq, n)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            batch.append(ScheduledSeq(seq, n))
            budget -= n
        return batch

    def _make_room(self, seq: Sequence, num_tokens: int) -> bool:
        """Preempt the newest running sequences until seq fits; False if seq itself went."""
        while not self.blocks.can_grow(seq, num_tokens):
            victim = max(self.running, key=lambda s: s.arrival)
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)  # first in line: it arrived before anything waiting
        self.num_preemptions += 1
