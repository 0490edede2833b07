"""Adaptive speculation: how many draft tokens each sequence gets this step.

Acceptance. A verification of γ drafts that accepts k of them is k successes and, when
k < γ, one failure of a geometric trial; a sequence's acceptance rate α is estimated from
its own recent verifications (decayed), shrunk towards its group's rate, which is shrunk
towards an optimistic prior (so an untried group gets tried). A group is an adapter and a
proposer: a draft model, or n-gram lookup with a match of n tokens (longer matches are
right more often). Group estimates slowly forget, so a group that stopped paying is
tried again later.

Cost. T(N), the seconds of a target step over N token rows, is learnt per N from decode
steps (a decayed mean), interpolated between the N seen, and extrapolated optimistically
past them (a sixteenth of the nearest step per row) so that longer drafts get tried. It is not a line: on a CPU, BLAS
runs a 1-row step as a GEMV and 2-4 rows as a far slower GEMM, so the first draft row can
cost most of a step while the next ones are nearly free. A draft-model pass adds d
seconds per draft depth.

Plan. The j-th draft of a sequence is emitted with probability about α^j. Candidates are
taken in order of that value; for every number R of draft rows the step's expected yield
Y(R) = Y₀ + (the R best values) and its cost T(N₀ + R) (+ d · depth) are known, and the
R with the most tokens per second wins. At batch 1 on a memory-bound step long confident
drafts win; in a large batch T is already dominated by its rows, no R pays, and
speculation switches itself off.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field


@dataclass
class Acceptance:
    """Decayed counts of one estimator: accepted drafts and first rejections."""

    accepted: float = 0.0
    rejected: float = 0.0

    def update(self, k: int, gamma: int, decay: float) -> None:
        self.accepted = self.accepted * decay + k
        self.rejected = self.rejected * decay + (1 if k < gamma else 0)

    def rate(self, prior: float, weight: float) -> float:
        """Posterior mean of α with `weight` pseudo-trials at `prior`."""
        return (self.accepted + prior * weight) / (self.accepted + self.rejected + weight)


@dataclass
class Totals:
    """Undecayed counters, for metrics."""

    proposed: int = 0
    accepted: int = 0
    verified: int = 0  # sequence-steps with a draft
    emitted: int = 0  # tokens those steps yielded (accepted + one each)


@dataclass
class AcceptanceStats:
    """Per-sequence and per-group estimates; totals per (adapter, method) for metrics."""

    prior: float = 0.8  # α of a group before it was tried: optimistic, so it is tried
    group_weight: float = 4.0  # pseudo-trials a group's estimate borrows from the prior
    seq_weight: float = 1.0  # pseudo-trials a sequence's estimate borrows from its group's
    seq_decay: float = 0.8  # a sequence's recent verifications count most (text changes)
    group_decay: float = 0.98
    forget: float = 0.998  # per planned step: an idle group drifts back to the prior
    groups: dict[tuple[str, str], Acceptance] = field(default_factory=dict)
    seqs: dict[str, Acceptance] = field(default_factory=dict)
    totals: dict[tuple[str, str], Totals] = field(default_factory=dict)

    def rate(self, request_id: str, group: tuple[str, str]) -> float:
        g = self.groups.get(group, Acceptance()).rate(self.prior, self.group_weight)
        return self.seqs.get(request_id, Acceptance()).rate(g, self.seq_weight)

    def record(
        self, request_id: str, group: tuple[str, str], total: tuple[str, str], k: int, gamma: int
    ) -> None:
        """One verification of `gamma` drafts with k accepted (group: the estimator's key,
        total: the (adapter, method) key of the metrics)."""
        self.groups.setdefault(group, Acceptance()).update(k, gamma, self.group_decay)
        self.seqs.setdefault(request_id, Acceptance()).update(k, gamma, self.seq_decay)
        t = self.totals.setdefault(total, Totals())
        t.proposed += gamma
        t.accepted += k
        t.verified += 1
        t.emitted += k + 1

    def age(self) -> None:
        for g in self.groups.values():
            g.accepted *= self.forget
            g.rejected *= self.forget

    def drop(self, request_id: str) -> None:
        self.seqs.pop(request_id, None)


@dataclass
class StepCost:
    """T(N): seconds of a target step over N rows, a decayed mean per N seen."""

    decay: float = 0.8  # weight of the older mean at each new observation of an N
    prior_slope: float = 1 / 16  # extra rows cost this fraction of a step each, unseen
    _mean: dict[int, float] = field(default_factory=dict)

    @property
    def observed(self) -> bool:
        return bool(self._mean)

    def observe(self, rows: int, seconds: float) -> None:
        old = self._mean.get(rows)
        self._mean[rows] = seconds if old is None else self.decay * old + (1 - self.decay) * seconds

    def seconds(self, rows: int) -> float:
        """T(rows): seen, interpolated between the nearest N seen, or extrapolated."""
        if rows in self._mean:
            return self._mean[rows]
        if not self._mean:
            return 1.0 + self.prior_slope * (rows - 1)  # in units of a 1-row step
        below = max((n for n in self._mean if n < rows), default=None)
        above = min((n for n in self._mean if n > rows), default=None)
        if below is not None and above is not None:
            t = (rows - below) / (above - below)
            return (1 - t) * self._mean[below] + t * self._mean[above]
        near = below if below is not None else above
        assert near is not None
        return self._mean[near] * max(1 + self.prior_slope * (rows - near), self.prior_slope)


@dataclass(frozen=True)
class Candidate:
    rate: float  # α of the sequence
    max_depth: int  # drafts it may take (γ, its proposal, its room)


def plan_depths(
    candidates: list[Candidate],
    base_rows: int,  # rows of the forward without drafts (prefill chunks and decodes)
    base_yield: int,  # tokens the step yields without drafts (sequences that sample)
    cost: StepCost,
    draft_pass: float = 0.0,  # seconds of one draft-model pass (0 for n-gram)
    budget: int | None = None,  # draft rows the step may add, at most
) -> list[int]:  # [len(candidates)] draft tokens per candidate
    """The draft rows that maximize the step's expected tokens per second (module doc)."""
    heap = [(-c.rate, i, 1) for i, c in enumerate(candidates) if c.max_depth > 0 and c.rate > 0]
    heapq.heapify(heap)
    order: list[tuple[int, int, float]] = []  # (candidate, depth, value), best first
    limit = budget if budget is not None else sum(c.max_depth for c in candidates)
    while heap and len(order) < limit:
        neg_value, i, j = heapq.heappop(heap)
        order.append((i, j, -neg_value))
        if j < candidates[i].max_depth:
            heapq.heappush(heap, (neg_value * candidates[i].rate, i, j + 1))
    best_rows, best = 0, base_yield / cost.seconds(base_rows)
    gain, depth = float(base_yield), 0
    for r, (_, j, value) in enumerate(order, 1):
        gain, depth = gain + value, max(depth, j)
        rate = gain / (cost.seconds(base_rows + r) + draft_pass * depth)
        if rate > best:
            best_rows, best = r, rate
    depths = [0] * len(candidates)
    for i, j, _ in order[:best_rows]:
        depths[i] = j
    return depths
