"""Speculative decoding inside the step: drafts into the scheduled batch, the verdict out.

    plan(batch)   propose (n-gram lookup or the draft model) for each sequence that
                  samples, size every draft with the adaptive control, reserve the
                  target's pages for it; the batch goes to the runner with its drafts
    tokens(...)   verify each draft against its γ + 1 target rows (greedy: the longest
                  matching prefix and the target's next token; sampled: speculative
                  sampling, worker/speculative/verify.py), roll rejected positions back
                  by page accounting, and sample the other rows as before

Greedy output is token-identical to plain decoding; sampled output keeps the target
distribution. docs/speculative.md has the design and the measurements.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from worker.memory.block_manager import BlockManager
from worker.sampling import probabilities, sample, uniform
from worker.sequence import ScheduledSeq, Sequence, SpecMethod
from worker.speculative.control import (
    AcceptanceStats,
    Candidate,
    StepCost,
    Totals,
    plan_depths,
)
from worker.speculative.draft import DraftProposer
from worker.speculative.ngram import NgramIndex
from worker.speculative.verify import first_rejections, verify_greedy, verify_rows


@dataclass(frozen=True)
class SpecSummary:
    proposed: int  # draft tokens verified
    accepted: int  # ... that the target accepted
    verified: int  # sequence-steps that verified a draft
    emitted: int  # tokens those sequence-steps yielded
    steps: int  # sequence-steps that sampled (with a draft or not)
    tokens: int  # tokens they yielded

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Mean tokens a sampling sequence gets per step (1.0 without speculation)."""
        return self.tokens / self.steps if self.steps else 0.0


class Speculator:
    def __init__(
        self,
        blocks: BlockManager,
        draft: DraftProposer | None,
        device: torch.device,
        max_len: int,
        adaptive: bool = True,
    ) -> None:
        self.blocks = blocks
        self.draft = draft
        self.device = device
        self.max_len = max_len
        self.adaptive = adaptive
        self.acceptance = AcceptanceStats()
        self.cost = StepCost()
        self.draft_pass_s = 0.0  # decayed mean seconds of one draft-model pass
        self.steps = 0
        self.tokens_out = 0
        self._ngrams: dict[str, NgramIndex] = {}
        self._group: dict[str, tuple[str, str]] = {}  # request id → its estimator this step
        self._q: dict[str, torch.Tensor] = {}  # request id → [γ, vocab] draft probabilities

    # -- before the forward ------------------------------------------------------

    def plan(self, batch: list[ScheduledSeq], budget: int) -> list[ScheduledSeq]:
        """The batch with drafts for the sequences that speculate (budget: rows to spare)."""
        ngram: dict[int, list[int]] = {}
        wants: dict[int, int] = {}
        self.acceptance.age()
        for i, item in enumerate(batch):
            seq, room = item.seq, self._room(item)
            if room <= 0:
                continue
            if seq.spec_method is SpecMethod.NGRAM:
                proposal, n = self._ngram(seq).propose(room)
                if proposal:
                    ngram[i], wants[i] = proposal, len(proposal)
                    self._group[seq.request_id] = (seq.adapter_id or "", f"ngram{n}")
            else:
                wants[i] = room
                self._group[seq.request_id] = (seq.adapter_id or "", "draft")
        if not wants:
            return batch
        depths = self._depths(batch, wants, budget)
        drafts = self._drafts(batch, depths, ngram)
        return [
            ScheduledSeq(item.seq, item.num_tokens + len(d), tuple(d)) if d else item
            for item, d in zip(batch, drafts, strict=True)
        ]

    def _room(self, item: ScheduledSeq) -> int:
        """Draft tokens item may take: γ, its remaining max_tokens, the context length."""
        seq = item.seq
        if not item.samples or seq.spec_method is SpecMethod.NONE:
            return 0
        if seq.spec_method is SpecMethod.DRAFT and self.draft is None:
            return 0
        remaining = seq.sampling.max_tokens - len(seq.output_ids) - 1
        return min(seq.spec_tokens, remaining, self.max_len - seq.num_tokens - 1)

    def _depths(self, batch: list[ScheduledSeq], wants: dict[int, int], budget: int) -> list[int]:
        depths = [0] * len(batch)
        order = list(wants)
        if not self.adaptive:  # γ as asked, while the step's token budget lasts
            for i in order:
                depths[i] = min(wants[i], budget)
                budget -= depths[i]
            return depths
        candidates = [Candidate(self._rate(batch[i].seq), wants[i]) for i in order]
        drafting = any(batch[i].seq.spec_method is SpecMethod.DRAFT for i in order)
        planned = plan_depths(
            candidates,
            base_rows=sum(item.num_tokens for item in batch),
            base_yield=sum(1 for item in batch if item.samples),
            cost=self.cost,
            draft_pass=self._draft_pass_cost() if drafting else 0.0,
            budget=budget,
        )
        for i, depth in zip(order, planned, strict=True):
            depths[i] = depth
        return depths

    def _drafts(
        self, batch: list[ScheduledSeq], depths: list[int], ngram: dict[int, list[int]]
    ) -> list[list[int]]:
        """Reserve the target's pages for each draft (shortened to what fits), then propose."""
        drafts: list[list[int]] = [[] for _ in batch]
        work: list[tuple[int, int]] = []
        for i, (item, depth) in enumerate(zip(batch, depths, strict=True)):
            depth = self._fits(item, depth)
            if depth <= 0:
                continue
            self.blocks.grow(item.seq, item.num_tokens + depth)
            if i in ngram:
                drafts[i] = ngram[i][:depth]
            else:
                work.append((i, depth))
        if work and self.draft is not None:
            started = time.perf_counter()
            proposals = self.draft.propose([(batch[i].seq, d) for i, d in work])
            passes = max(len(p.tokens) for p in proposals)
            if passes:
                seconds = (time.perf_counter() - started) / passes
                old = self.draft_pass_s
                self.draft_pass_s = 0.8 * old + 0.2 * seconds if old else seconds
            for (i, _), proposal in zip(work, proposals, strict=True):
                drafts[i] = proposal.tokens
                if proposal.q is not None:
                    self._q[batch[i].seq.request_id] = proposal.q
        return drafts

    def _fits(self, item: ScheduledSeq, depth: int) -> int:
        """The largest d ≤ depth whose pages the pool can give item's sequence now."""
        seq, pt = item.seq, self.blocks.page_tokens
        held = len(seq.block_table) * pt - seq.num_computed - item.num_tokens
        return min(depth, held + self.blocks.allocator.num_free * pt)

    # -- after the forward -------------------------------------------------------

    def tokens(
        self, ordered: list[ScheduledSeq], logits: torch.Tensor
    ) -> list[tuple[Sequence, list[int]]]:
        """New tokens of every sequence that sampled (logits: [Σ num_logits, vocab]).

        Every item's num_computed advances by the tokens it fed, then the positions of
        rejected drafts are truncated from the target's (and the draft's) cache."""
        plain: list[tuple[ScheduledSeq, int]] = []  # (item, its first logits row)
        spec: list[tuple[ScheduledSeq, int]] = []
        row = 0
        for item in ordered:
            if item.samples:
                (spec if item.draft else plain).append((item, row))
                row += item.num_logits
        found: list[tuple[ScheduledSeq, list[int]]] = []
        if plain:
            seqs = [item.seq for item, _ in plain]
            picked = sample(
                logits[self._index([r for _, r in plain])],
                [s.sampling for s in seqs],
                [len(s.output_ids) for s in seqs],
            )
            found += [(item, [t]) for (item, _), t in zip(plain, picked, strict=True)]
        verdicts = self._verdicts(spec, logits)
        for item in ordered:
            item.seq.num_computed += item.num_tokens
        for (item, _), (k, token) in zip(spec, verdicts, strict=True):
            self._settle(item, k)
            found.append((item, [*item.draft[:k], token]))
        self.steps += len(found)
        self.tokens_out += sum(len(t) for _, t in found)
        position = {id(item): i for i, item in enumerate(ordered)}
        return [(item.seq, t) for item, t in sorted(found, key=lambda f: position[id(f[0])])]

    def _verdicts(
        self, spec: list[tuple[ScheduledSeq, int]], logits: torch.Tensor
    ) -> list[tuple[int, int]]:
        """(accepted drafts, the token after them) per verified item, in order."""
        greedy = [i for i, (item, _) in enumerate(spec) if item.seq.sampling.greedy]
        sampled = [i for i, (item, _) in enumerate(spec) if not item.seq.sampling.greedy]
        verdicts: dict[int, tuple[int, int]] = {}
        if greedy:
            rows = [
                r + j for item, r in (spec[i] for i in greedy) for j in range(len(item.draft) + 1)
            ]
            argmax = logits[self._index(rows)].argmax(dim=-1).tolist()
            at = 0
            for i in greedy:
                draft = spec[i][0].draft
                verdicts[i] = verify_greedy(argmax[at : at + len(draft) + 1], draft)
                at += len(draft) + 1
        if sampled:
            found = self._verify_sampled([spec[i] for i in sampled], logits)
            verdicts.update(zip(sampled, found, strict=True))
        return [verdicts[i] for i in range(len(spec))]

    def _verify_sampled(
        self, spec: list[tuple[ScheduledSeq, int]], logits: torch.Tensor
    ) -> list[tuple[int, int]]:
        accept, token = verify_rows(*self.verify_inputs(spec, logits))
        return first_rejections(accept.tolist(), token.tolist(), [len(i.draft) for i, _ in spec])

    def verify_inputs(
        self, spec: list[tuple[ScheduledSeq, int]], logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """verify_rows' p, q, x, u for sampled items (item, first logits row), on the device:
        rows [Σ (γ + 1)], each sequence's last row without a proposal."""
        p_rows: list[torch.Tensor] = []
        q_rows: list[torch.Tensor] = []
        x: list[int] = []
        u: list[float] = []
        vocab = logits.shape[-1]
        for item, r in spec:
            seq, n = item.seq, len(item.draft) + 1
            p_rows.append(probabilities(logits[r : r + n], seq.sampling))  # [γ + 1, vocab]
            q = torch.zeros(n, vocab, dtype=torch.float32, device=logits.device)
            proposal_q = self._q.pop(seq.request_id, None)
            if proposal_q is None:  # n-gram: one-hot
                q[:-1].scatter_(1, self._index(list(item.draft))[:, None], 1.0)
            else:
                q[:-1] = proposal_q[: n - 1]
            q_rows.append(q)
            x.extend([*item.draft, 0])
            first = len(seq.output_ids)
            u.extend(uniform(seq.sampling.seed, first + j) for j in range(n))
        return (
            torch.cat(p_rows),
            torch.cat(q_rows),
            self._index(x),
            torch.tensor(u, dtype=torch.float64, device=logits.device),
        )

    def _settle(self, item: ScheduledSeq, k: int) -> None:
        """Roll back the rejected drafts' K/V (target and draft) and record the verdict."""
        seq, gamma = item.seq, len(item.draft)
        self.blocks.truncate(seq, seq.num_computed - (gamma - k))
        if seq.spec_method is SpecMethod.DRAFT and self.draft is not None:
            self.draft.rollback(seq, k)
        group = self._group.get(seq.request_id, _totals_key(seq))
        self.acceptance.record(seq.request_id, group, _totals_key(seq), k, gamma)

    # -- control and bookkeeping ----------------------------------------------------

    def observe(self, batch: list[ScheduledSeq], seconds: float) -> None:
        """Time of one target step (forward and verdict); prefill steps are left out."""
        if all(item.num_tokens == 1 + len(item.draft) for item in batch):
            self.cost.observe(sum(item.num_tokens for item in batch), seconds)

    def forget(self, seq: Sequence) -> None:
        self._ngrams.pop(seq.request_id, None)
        self._q.pop(seq.request_id, None)
        self.acceptance.drop(seq.request_id)
        self._group.pop(seq.request_id, None)
        if self.draft is not None:
            self.draft.forget(seq.request_id)

    def summary(self) -> SpecSummary:
        totals = list(self.acceptance.totals.values())
        return SpecSummary(
            proposed=sum(t.proposed for t in totals),
            accepted=sum(t.accepted for t in totals),
            verified=sum(t.verified for t in totals),
            emitted=sum(t.emitted for t in totals),
            steps=self.steps,
            tokens=self.tokens_out,
        )

    def by_adapter(self) -> dict[tuple[str, str], Totals]:
        """(adapter id or "" for the base model, method) → its counters."""
        return dict(self.acceptance.totals)

    def _rate(self, seq: Sequence) -> float:
        return self.acceptance.rate(
            seq.request_id, self._group.get(seq.request_id, _totals_key(seq))
        )

    def _draft_pass_cost(self) -> float:
        """Seconds of one draft pass, on the scale of the target's cost (a quarter of a
        target step before either was timed)."""
        if self.cost.observed and self.draft_pass_s:
            return self.draft_pass_s
        return 0.25 * self.cost.seconds(1)

    def _ngram(self, seq: Sequence) -> NgramIndex:
        index = self._ngrams.get(seq.request_id)
        if index is None:
            index = self._ngrams[seq.request_id] = NgramIndex()
        index.sync(seq.prompt_ids, seq.output_ids)
        return index

    def _index(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)


def _totals_key(seq: Sequence) -> tuple[str, str]:
    return seq.adapter_id or "", str(seq.spec_method)
