"""Requests as the engine sees them: sampling parameters, sequences, and token events."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. temperature 0 means greedy; top_k 0 means no top-k cut."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 64
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class SpecMethod(enum.StrEnum):
    """Where draft tokens come from (docs/speculative.md)."""

    NONE = "none"  # plain decoding
    NGRAM = "ngram"  # prompt lookup: the continuation of the last n-gram's earlier occurrence
    DRAFT = "draft"  # a small draft model sharing the tokenizer


MAX_SPECULATIVE_TOKENS = 16  # γ per step, at most (the API's limit too)


@dataclass(frozen=True)
class SpeculativeParams:
    """Per-request speculation: method None means the server's default, num_tokens 0 its γ.

    Speculation never changes what is generated (greedy output is token-identical, sampled
    output keeps the target distribution); it only changes how many tokens a step yields.
    """

    method: SpecMethod | None = None
    num_tokens: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.num_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"num_tokens must be in [0, {MAX_SPECULATIVE_TOKENS}]")


class NotServedHere(Exception):
    """A valid request this engine cannot serve as asked (a draft-model speculation on a
    worker started without a draft model): FAILED_PRECONDITION, never a silent change."""


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS or a stop string
    LENGTH = "length"  # max_tokens or the model's context length
    CANCELLED = "cancelled"
    ERROR = "error"


class SeqStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to recompute
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenEvent:
    """What one step produced for one request. The last event has finish_reason set."""

    request_id: str
    token_ids: list[int]  # tokens sampled this step (0 or more)
    text: str  # new text; never ends inside a UTF-8 character
    finish_reason: FinishReason | None = None
    error: str | None = None  # set when finish_reason is ERROR
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False)
class Sequence:
    """One request inside the engine: its tokens, its pages, its adapter and its state.

    Compared by identity (an entity, not a value): the scheduler's `in` and `remove` on
    its queues then cost a pointer comparison per entry, where the generated __eq__
    compared every field (~500 comparisons a step at 32 running sequences)."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    adapter_id: str | None
    arrival: int  # engine step counter at arrival (admission order, no starvation)
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)  # KV page ids, in order
    num_computed: int = 0  # tokens whose K/V are in the cache
    waiting_since: int = 0  # scheduler step when it (re)joined the waiting queue
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: FinishReason | None = None
    spec_method: SpecMethod = SpecMethod.NONE  # resolved against the server's default
    spec_tokens: int = 0  # γ: draft tokens per step, at most

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed


@dataclass(frozen=True)
class ScheduledSeq:
    """One sequence's share of a step: its uncomputed tokens (a chunk), then any draft."""

    seq: Sequence
    num_tokens: int  # tokens fed this step: 1 for a decode, a chunk for a prefill, + draft
    draft: tuple[int, ...] = ()  # proposed tokens to verify after the sequence's own

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the sequence's tokens."""
        return self.seq.num_computed + self.num_tokens - len(self.draft) == self.seq.num_tokens

    @property
    def num_logits(self) -> int:
        """Rows whose next-token logits are wanted: the last own token's and each draft's."""
        return 1 + len(self.draft) if self.samples else 0

    @property
    def input_ids(self) -> list[int]:
        """The tokens fed this step, [num_tokens]: the uncomputed chunk, then the draft."""
        start = self.seq.num_computed
        own = self.seq.token_ids[start : start + self.num_tokens - len(self.draft)]
        return own + list(self.draft)
