"""The draft model of speculative decoding: loaded or cut from the target, its KV in the pool.

A draft is any causal LM sharing the target's tokenizer (same vocabulary), or the target's
own first layers and head (`draft_layers`, weights shared: no extra memory). It runs
through a ModelRunner like the target, over the same page pool: its blocks are whole
pages of t_d tokens (worker/memory/draft_kv.py) from the same allocator and budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from worker.config import EngineConfig
from worker.kernels.lora_cpu import CpuLora
from worker.lora.resident import ModelShape, ResidentAdapter
from worker.memory.block_manager import BlockManager
from worker.memory.draft_kv import DraftGeometry
from worker.memory.pool import MemoryPool
from worker.model.llama import LlamaModel
from worker.model.loader import load_model
from worker.model.source import resolve_model_dir
from worker.runner import ModelRunner
from worker.sampling import DRAFT_STREAM, inverse_cdf, probabilities, uniform
from worker.sequence import ScheduledSeq, Sequence
from worker.speculative.draft import DraftForward, DraftProposer


def load_draft(config: EngineConfig, target: LlamaModel) -> LlamaModel | None:
    """config.draft_model (the target itself when it names the same weights), cut to
    config.draft_layers layers when that is set; None without a draft model."""
    if config.draft_model is None:
        return None
    draft_dir = resolve_model_dir(config.draft_model, config.cache_dir)
    if draft_dir == resolve_model_dir(config.model, config.cache_dir):
        model = target
    else:
        model = load_model(draft_dir, target.device, target.dtype)
    return first_layers(model, config.draft_layers) if config.draft_layers else model


def first_layers(model: LlamaModel, layers: int) -> LlamaModel:
    """The model's embedding, first `layers` layers, final norm and head (shared tensors)."""
    if not 0 < layers <= model.config.num_layers:
        raise ValueError(f"draft_layers must be in [1, {model.config.num_layers}], got {layers}")
    config = replace(model.config, num_layers=layers)
    return LlamaModel(config, model.embed, model.layers[:layers], model.norm, model.lm_head)


def draft_proposer(
    draft: LlamaModel,
    target: LlamaModel,
    pool: MemoryPool,
    shape: ModelShape,
    adapter_of: Callable[[str], ResidentAdapter],
    cpu_lora: CpuLora | None = None,
) -> DraftProposer:
    """A proposer running `draft` over its own KV blocks in the target's page pool. A draft
    cut from the target (its first layers, the same tensors) runs each sequence's adapter
    on those layers: the adapter's resident pages serve both models."""
    c = draft.config
    if c.vocab_size != target.config.vocab_size:
        raise ValueError(
            f"the draft's vocabulary ({c.vocab_size}) is not the target's "
            f"({target.config.vocab_size}): a draft must share the tokenizer"
        )
    if draft.device != target.device:
        raise ValueError(f"the draft is on {draft.device}, the target on {target.device}")
    geometry = DraftGeometry.fit(pool.geometry, c.num_layers, c.kv_size)
    runner = ModelRunner(
        draft, geometry.kv_rows(pool.buffer), pool.lora, geometry.block_tokens, shape, cpu_lora
    )
    blocks = BlockManager(pool.allocator, geometry.block_tokens)
    own = is_cut_of(draft, target)

    def run(items: list[ScheduledSeq]) -> tuple[list[ScheduledSeq], torch.Tensor]:
        return runner.run(items, adapter_of)

    return DraftProposer(in_order(run), blocks, draft_pick, with_adapters=own)


def is_cut_of(draft: LlamaModel, target: LlamaModel) -> bool:
    """Whether draft is target's first layers (the same tensors), so its adapters fit."""
    return draft.embed is target.embed and all(
        a is b for a, b in zip(draft.layers, target.layers, strict=False)
    )


def draft_pick(
    logits: torch.Tensor,  # [S, vocab] the draft's last-row logits
    seqs: list[Sequence],  # [S] the target sequences
    index: list[int],  # [S] the output index each draft token is for
) -> tuple[list[int], torch.Tensor | None]:  # tokens [S], q [S, vocab] (None: all greedy)
    tokens, q = draft_draw(logits, seqs, index)
    return tokens.tolist(), q


def draft_draw(
    logits: torch.Tensor,  # [S, vocab]
    seqs: list[Sequence],  # [S]
    index: list[int],  # [S]
) -> tuple[torch.Tensor, torch.Tensor | None]:  # tokens [S] long, q [S, vocab] on the device
    """The draft's proposal per row: its argmax for greedy requests, else a draw from
    q = the draft's distribution under the request's temperature, top-k and top-p (the
    draw u from the DRAFT stream: the sequence's own draws are left as they are)."""
    tokens = logits.argmax(dim=-1)
    rows = [i for i, s in enumerate(seqs) if not s.sampling.greedy]
    if not rows:
        return tokens, None
    q = torch.zeros_like(logits)
    for i in rows:
        q[i] = probabilities(logits[i], seqs[i].sampling)
    where = torch.tensor(rows, dtype=torch.long, device=logits.device)
    u = [uniform(seqs[i].sampling.seed, index[i], DRAFT_STREAM) for i in rows]
    drawn = inverse_cdf(q[where], torch.tensor(u, dtype=torch.float64, device=logits.device))
    return tokens.index_copy(0, where, drawn), q


def in_order(
    run: Callable[[list[ScheduledSeq]], tuple[list[ScheduledSeq], torch.Tensor]],
) -> DraftForward:
    """A runner's run (which reorders the batch) as a forward returning rows in order."""

    def forward(items: list[ScheduledSeq]) -> torch.Tensor:  # [len(items), vocab]
        ordered, logits = run(items)
        where = {id(item.seq): row for row, item in enumerate(ordered)}
        rows = [where[id(item.seq)] for item in items]
        return logits[torch.tensor(rows, dtype=torch.long, device=logits.device)]

    return forward
