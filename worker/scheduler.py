"""Continuous batching under a token budget and one page budget for KV blocks and adapters.

Each step: running sequences first (oldest first; a decode costs one token, an unfinished
prefill continues in a chunk), then waiting ones while the token budget, the sequence
limit and the page pool allow. A waiting sequence is admitted once its adapter is in host
memory (loads run in the background; a loading adapter never stalls the step), and it
needs the pages of its first chunk's KV plus its adapter's pages when the adapter is not
on the device. Admission prefers adapters already on the device unless a sequence has
waited `max_wait_steps` steps (no starvation). When pages run short, idle adapters (not
used by the batch: pinned) are evicted LRU-first, then the newest running sequence is
preempted (recompute). Adapters per batch are bounded by what fits, so the pool never
overflows and never deadlocks with every resident adapter pinned. Pages of caches that can
be recomputed (a speculative draft model's KV) are reclaimed before anything else.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from worker.lora.manager import AdapterManager
from worker.memory.allocator import OutOfPages
from worker.memory.block_manager import BlockManager
from worker.sequence import ScheduledSeq, SeqStatus, Sequence


@dataclass(frozen=True)
class SchedulerLimits:
    max_num_seqs: int
    max_batch_tokens: int
    max_wait_steps: int = 64  # a sequence waiting this long is admitted in arrival order


class Spare(Protocol):
    """Pages of a cache that is only an optimization (a draft model's KV)."""

    def pages(self) -> int: ...
    def reclaim(self, enough: Callable[[], bool]) -> None: ...


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        adapters: AdapterManager,
        limits: SchedulerLimits,
        spare: Spare | None = None,  # reclaimed first when pages run short
    ) -> None:
        self.blocks = blocks
        self.adapters = adapters
        self.limits = limits
        self.spare = spare
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.step_index = 0

    def add(self, seq: Sequence) -> None:
        seq.waiting_since = self.step_index
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

    def pinned(self) -> set[str]:
        """Adapters the running batch uses: never evicted."""
        return {s.adapter_id for s in self.running if s.adapter_id is not None}

    def schedule(self) -> list[ScheduledSeq]:
        self.step_index += 1
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
        for seq in list(self._admission_order()):
            if budget <= 0 or len(self.running) >= self.limits.max_num_seqs:
                break
            n = min(seq.num_uncomputed, budget)
            if not self._admit(seq, n):
                break
            batch.append(ScheduledSeq(seq, n))
            budget -= n
        return batch

    def _admission_order(self) -> Iterator[Sequence]:
        """Sequences that waited too long in arrival order, then device-resident adapters first."""
        waited = self.step_index - self.limits.max_wait_steps
        aged = [s for s in self.waiting if s.waiting_since <= waited]
        rest = [s for s in self.waiting if s.waiting_since > waited]
        rest.sort(key=lambda s: (not self._on_device(s), s.arrival))
        for seq in aged + rest:
            if seq.adapter_id is None or self.adapters.ready(seq.adapter_id):
                yield seq  # others are still loading: they wait without blocking the rest

    def _on_device(self, seq: Sequence) -> bool:
        return seq.adapter_id is None or seq.adapter_id in self.adapters.resident

    def _admit(self, seq: Sequence, n: int) -> bool:
        """Page in seq's adapter and its first chunk's KV, evicting idle adapters; or False."""
        pinned = self.pinned()
        need = self.blocks.pages_needed(seq, n) + self.adapters.pages_needed(seq.adapter_id)
        if not self._evict_until(need, pinned):
            return False
        if seq.adapter_id is not None:
            try:
                self.adapters.make_resident(seq.adapter_id)
            except OutOfPages:  # scattered pages took one more than counted
                return False
        if not self.blocks.can_grow(seq, n):
            return False
        self.waiting.remove(seq)
        self.blocks.grow(seq, n)
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)
        return True

    def _evict_until(self, pages: int, pinned: set[str]) -> bool:
        """Reclaim spare pages, then evict idle adapters (LRU) until `pages` are free; False
        if that cannot be done."""
        allocator = self.blocks.allocator
        idle = self.adapters.evictable(pinned)
        reclaimable = sum(len(self.adapters.get(a).pages) for a in idle)
        spare = self.spare.pages() if self.spare is not None else 0
        if pages > allocator.num_free + reclaimable + spare:
            return False
        if self.spare is not None and allocator.num_free < pages:
            self.spare.reclaim(lambda: allocator.num_free >= pages)
        for adapter_id in idle:
            if allocator.num_free >= pages:
                break
            self.adapters.evict(adapter_id)
        return allocator.num_free >= pages

    def _make_room(self, seq: Sequence, num_tokens: int) -> bool:
        """Evict idle adapters, then preempt the newest running sequences until seq fits."""
        while not self._evict_until(self.blocks.pages_needed(seq, num_tokens), self.pinned()):
            victim = max(self.running, key=lambda s: s.arrival)
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.status = SeqStatus.WAITING
        seq.waiting_since = self.step_index - self.limits.max_wait_steps  # first in line again
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
