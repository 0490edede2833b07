"""The engine: requests in, token events out, one continuous-batching step at a time.

    step():  start adapter loads for what waits → schedule (admission pages adapters and
             KV into one pool) → run the model → sample, detokenize, check stops → events

Everything the step needs is owned here and passed down; nothing is global. Adapter loads
run on background threads (the host tier); the step never waits on one.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from worker import decode_graphs
from worker.config import EngineConfig
from worker.detokenizer import Detokenizer, skipped_ids
from worker.drafting import draft_proposer, load_draft
from worker.kernels import lora_cpu
from worker.lora.adapter import load_host_adapter
from worker.lora.host_cache import HostCache, Loader
from worker.lora.manager import AdapterManager, Tier
from worker.lora.resident import model_shape
from worker.memory.block_manager import BlockManager
from worker.memory.geometry import PageGeometry
from worker.memory.pool import MemoryPool, lora_dtype_for
from worker.model.llama import LlamaModel
from worker.model.loader import eos_ids, load_model, load_tokenizer, resolve_dtype
from worker.model.source import resolve_model_dir
from worker.runner import ModelRunner
from worker.scheduler import Scheduler, SchedulerLimits
from worker.sequence import (
    FinishReason,
    NotServedHere,
    SamplingParams,
    Sequence,
    SpecMethod,
    SpeculativeParams,
    TokenEvent,
)
from worker.speculative.control import Totals
from worker.speculator import Speculator

Prompt = str | list[int] | list[dict[str, str]]


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    adapters_loaded: int  # resident in device pages
    adapters_on_host: int
    free_pages: int
    kv_pages: int
    adapter_pages: int
    total_pages: int
    largest_free_run: int
    adapter_padding: float  # (adapter page elements − weight elements) / weight elements
    preemptions: int
    device_hits: int
    device_misses: int
    device_evictions: int
    host_hits: int
    host_misses: int
    host_loads: int
    host_evictions: int
    host_load_seconds: float  # total
    page_in_seconds: float  # total
    prefetched: int
    prefetched_in_time: int
    spec_proposed: int  # draft tokens verified
    spec_accepted: int  # ... accepted by the target
    spec_acceptance_rate: float  # accepted / proposed
    spec_tokens_per_step: float  # tokens a sampling sequence gets per step (1.0: none)
    spec_draft_pages: int  # pages holding a draft model's KV (part of kv_pages)
    spec_by_adapter: dict[tuple[str, str], Totals]  # (adapter or "", method) → counters


@dataclass
class _Live:
    seq: Sequence
    detok: Detokenizer


class Engine:
    def __init__(
        self,
        config: EngineConfig,
        model: LlamaModel,
        tokenizer: Any,
        adapter_loader: Loader | None = None,  # tests and benchmarks substitute one
        draft_model: LlamaModel | None = None,  # speculation's draft (shares the tokenizer)
    ) -> None:
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self._skipped = skipped_ids(tokenizer)  # special tokens: detokenizing skips them
        geometry = page_geometry(model, config.page_size)
        num_pages = config.num_pages or geometry.pages_for_budget(config.memory_mb)
        lora_dtype = lora_dtype_for(config.lora_dtype, model.dtype, model.device)
        self.pool = MemoryPool(geometry, num_pages, model.dtype, model.device, lora_dtype)
        loader = adapter_loader or partial(
            load_host_adapter,
            base=model.config.spec,
            max_rank=config.max_lora_rank,
            dtype=lora_dtype,
            pin=model.device.type == "cuda",
        )
        host = HostCache(loader, config.host_cache_mb * 2**20)
        self.adapters = AdapterManager(self.pool, model_shape(model.config), host)
        self.blocks = BlockManager(self.pool.allocator, config.page_size)
        draft = None
        kernels = Path(config.cache_dir) / "kernels"
        self.cpu_lora = lora_cpu.kernel_for(model.device, model.dtype, kernels, config.cpu_kernels)
        if draft_model is not None:
            shape = model_shape(draft_model.config)
            draft = draft_proposer(
                draft_model, model, self.pool, shape, self.adapters.get, self.cpu_lora
            )
        self.scheduler = Scheduler(
            self.blocks,
            self.adapters,
            SchedulerLimits(config.max_num_seqs, config.max_batch_tokens),
            spare=draft,
        )
        self.runner = ModelRunner(
            model,
            self.pool.kv_rows,
            self.pool.lora,
            config.page_size,
            model_shape(model.config),
            self.cpu_lora,
        )
        self.runner.graphs = decode_graphs.for_engine(model, self.pool, config)
        self.usable_pages = self.pool.allocator.num_free  # all but what the graphs hold
        self.max_len = min(config.max_model_len, self.usable_pages * config.page_size)
        self.eos_ids = eos_ids(model.config, tokenizer)
        self.speculator = Speculator(
            self.blocks, draft, model.device, self.max_len, config.speculative_adaptive
        )
        self._live: dict[str, _Live] = {}
        self._pending: list[TokenEvent] = []
        self._arrivals = itertools.count()

    @classmethod
    def from_config(cls, config: EngineConfig, adapter_loader: Loader | None = None) -> Engine:
        model_dir = resolve_model_dir(config.model, config.cache_dir)
        device = torch.device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        model = load_model(model_dir, device, dtype, config.quantize, config.compute_dtype)
        draft = load_draft(config, model)
        return cls(config, model, load_tokenizer(model_dir), adapter_loader, draft)

    # -- requests ---------------------------------------------------------------

    def register_adapter(self, adapter_id: str, source: Path) -> None:
        """Make an adapter (PEFT directory or registry blob) known; it loads on first use."""
        self.adapters.register(adapter_id, Path(source))

    def forget_adapter(self, adapter_id: str) -> None:
        """Drop an adapter from every tier (its source is gone), unless a request uses it."""
        if all(live.seq.adapter_id != adapter_id for live in self._live.values()):
            self.adapters.forget(adapter_id)

    def prefetch_adapter(self, adapter_id: str) -> None:
        """Start loading a registered adapter into host memory ahead of its requests."""
        self.adapters.prefetch(adapter_id, ahead=True)

    def adapter_tier(self, adapter_id: str) -> Tier:
        return self.adapters.tier(adapter_id)

    def add_request(
        self,
        request_id: str,
        prompt: Prompt,
        sampling: SamplingParams,
        adapter_id: str | None = None,
        speculative: SpeculativeParams | None = None,  # None: the server's default
    ) -> None:
        """Queue a request; raises ValueError for a request that can never run."""
        if request_id in self._live:
            raise ValueError(f"request id {request_id!r} is already running")
        if adapter_id is not None and not self.adapters.knows(adapter_id):
            raise ValueError(f"unknown adapter {adapter_id!r}")
        ids = self.encode(prompt)
        if len(ids) >= self.max_len:
            raise ValueError(f"prompt has {len(ids)} tokens; the limit is {self.max_len - 1}")
        seq = Sequence(request_id, ids, sampling, adapter_id, next(self._arrivals))
        seq.spec_method, seq.spec_tokens = self._speculation(speculative or SpeculativeParams())
        detok = Detokenizer(self.tokenizer, ids, sampling.stop, self._skipped)
        self._live[request_id] = _Live(seq, detok)
        self.scheduler.add(seq)
        if adapter_id is not None:
            self.adapters.prefetch(adapter_id)  # the host load starts now, in the background

    def _speculation(self, asked: SpeculativeParams) -> tuple[SpecMethod, int]:
        """The request's method and γ, the server's where it did not choose. A request that
        asks for a draft model where this engine has none is refused, not quietly served
        another way (the server's own default is checked when the engine starts)."""
        method = asked.method or SpecMethod(self.config.speculative)
        if method is SpecMethod.DRAFT and self.speculator.draft is None:
            raise NotServedHere(
                "speculative method 'draft' asked, but this worker has no draft model "
                "(start it with --draft-model, or ask for ngram)"
            )
        return method, asked.num_tokens or self.config.num_speculative_tokens

    def cancel(self, request_id: str) -> None:
        """Stop a request now: its pages are freed and its final event is CANCELLED."""
        live = self._live.get(request_id)
        if live is not None:
            self._pending.append(self._finish(live, [], "", FinishReason.CANCELLED))

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif prompt and all(isinstance(m, dict) for m in prompt):
            text = self.tokenizer.apply_chat_template(
                prompt, tokenize=False, add_generation_prompt=True
            )
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        else:
            ids = list(prompt)
            vocab = self.model.config.vocab_size
            if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
                raise ValueError(f"token ids must be integers in [0, {vocab})")
        if not ids:
            raise ValueError("prompt is empty")
        return [int(t) for t in ids]

    # -- the step ---------------------------------------------------------------

    def step(self) -> list[TokenEvent]:
        with device_scope(self.model.device):
            events, self._pending = self._pending, []
            events += self._start_adapter_loads()
            batch = self.scheduler.schedule()
            if batch:
                spare = self.config.max_batch_tokens - sum(item.num_tokens for item in batch)
                batch = self.speculator.plan(batch, spare)
                started = time.perf_counter()
                ordered, logits = self.runner.run(batch, self.adapters.get)
                new = self.speculator.tokens(ordered, logits)  # rolls back rejected drafts
                self.speculator.observe(batch, time.perf_counter() - started)
                events += [self._append(seq, tokens) for seq, tokens in new]
            return events

    def has_unfinished(self) -> bool:
        return bool(self._live or self._pending)

    def num_free_pages(self) -> int:
        return self.pool.allocator.num_free

    def stats(self) -> EngineStats:
        counts = self.pool.allocator.counts()
        held, weights = self.adapters.padding_elems()
        host, device = self.adapters.host.stats, self.adapters.stats
        spec = self.speculator.summary()
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            adapters_loaded=len(self.adapters.resident),
            adapters_on_host=self.adapters.host.num_ready,
            free_pages=counts.free,
            kv_pages=counts.kv,
            adapter_pages=counts.adapter,
            total_pages=counts.total,
            largest_free_run=counts.largest_free_run,
            adapter_padding=(held - weights) / weights if weights else 0.0,
            preemptions=self.scheduler.num_preemptions,
            device_hits=device.hits,
            device_misses=device.misses,
            device_evictions=device.evictions,
            host_hits=host.hits,
            host_misses=host.misses,
            host_loads=host.loads,
            host_evictions=host.evictions,
            host_load_seconds=host.load_seconds,
            page_in_seconds=device.page_in_seconds,
            prefetched=device.prefetched,
            prefetched_in_time=device.prefetched_in_time,
            spec_proposed=spec.proposed,
            spec_accepted=spec.accepted,
            spec_acceptance_rate=spec.acceptance_rate,
            spec_tokens_per_step=spec.tokens_per_step,
            spec_draft_pages=self.speculator.draft.pages() if self.speculator.draft else 0,
            spec_by_adapter=self.speculator.by_adapter(),
        )

    def _start_adapter_loads(self) -> list[TokenEvent]:
        """Start host loads for what waits (background); fail requests that can never run."""
        lookahead = itertools.islice(self.scheduler.waiting, 2 * self.config.max_num_seqs)
        events = []
        for seq in list(lookahead):
            if seq.adapter_id is None or seq.request_id not in self._live:
                continue
            self.adapters.prefetch(seq.adapter_id)
            problem = self._unservable(seq)
            if problem is not None:
                live = self._live[seq.request_id]
                events.append(self._finish(live, [], "", FinishReason.ERROR, problem))
        return events

    def _unservable(self, seq: Sequence) -> str | None:
        """Why seq can never run here: its adapter failed to load, or it cannot fit the pool."""
        assert seq.adapter_id is not None
        tier = self.adapters.tier(seq.adapter_id)
        if tier is Tier.FAILED:
            return self.adapters.error(seq.adapter_id)
        if tier is Tier.HOST:
            adapter_pages = self.adapters.pages_needed(seq.adapter_id)
            need = adapter_pages + self.blocks.blocks_for(len(seq.prompt_ids) + 1)
            if need > self.usable_pages:
                return (
                    f"adapter {seq.adapter_id} and the prompt need {need} pages; the memory "
                    f"pool has {self.usable_pages}: raise --memory-mb"
                )
        return None

    def _append(self, seq: Sequence, tokens: list[int]) -> TokenEvent:
        """Append a step's tokens in order, stopping exactly where plain decoding would."""
        live, text = self._live[seq.request_id], ""
        for n, token in enumerate(tokens, 1):
            seq.output_ids.append(token)
            if token in self.eos_ids and not seq.sampling.ignore_eos:
                return self._finish(live, tokens[:n], text + live.detok.flush(), FinishReason.STOP)
            new, stopped = live.detok.add(token)
            text += new
            if stopped:
                return self._finish(live, tokens[:n], text, FinishReason.STOP)
            if len(seq.output_ids) >= seq.sampling.max_tokens or seq.num_tokens >= self.max_len:
                text += live.detok.flush()
                return self._finish(live, tokens[:n], text, FinishReason.LENGTH)
        return self._event(seq, tokens, text, None)

    def _finish(
        self,
        live: _Live,
        tokens: list[int],
        text: str,
        reason: FinishReason,
        error: str | None = None,
    ) -> TokenEvent:
        seq = live.seq
        self.scheduler.remove(seq)
        self.speculator.forget(seq)
        seq.finish_reason = reason
        del self._live[seq.request_id]
        return self._event(seq, tokens, text, reason, error)

    @staticmethod
    def _event(
        seq: Sequence,
        tokens: list[int],
        text: str,
        reason: FinishReason | None,
        error: str | None = None,
    ) -> TokenEvent:
        return TokenEvent(
            seq.request_id, tokens, text, reason, error, len(seq.prompt_ids), len(seq.output_ids)
        )

    # -- convenience ------------------------------------------------------------

    def generate(
        self,
        prompts: Iterable[Prompt],
        sampling: SamplingParams,
        adapters: Iterable[str | None] | None = None,
    ) -> list[TokenEvent]:
        """Run prompts to completion; one summary event per prompt (all tokens, all text)."""
        prompts = list(prompts)
        adapter_ids = list(adapters) if adapters is not None else [None] * len(prompts)
        results: dict[str, TokenEvent] = {}
        for i, (prompt, adapter_id) in enumerate(zip(prompts, adapter_ids, strict=True)):
            rid = f"generate-{i}"
            self.add_request(rid, prompt, sampling, adapter_id)
            results[rid] = TokenEvent(rid, [], "")
        while self.has_unfinished():
            for event in self.step():
                total = results[event.request_id]
                total.token_ids += event.token_ids
                total.text += event.text
                total.finish_reason, total.error = event.finish_reason, event.error
                total.prompt_tokens = event.prompt_tokens
                total.completion_tokens = event.completion_tokens
        return list(results.values())


def device_scope(device: torch.device) -> AbstractContextManager[Any]:
    """The model's CUDA device made current for a step (in the stepping thread): Triton
    launches on the current device, and the decode graphs capture on its streams, so an
    engine on cuda:1 would otherwise hand device 0's kernels cuda:1's pointers."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def page_geometry(model: LlamaModel, page_tokens: int) -> PageGeometry:
    c = model.config
    return PageGeometry(
        num_layers=c.num_layers,
        page_tokens=page_tokens,
        num_kv_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        itemsize=torch.empty((), dtype=model.dtype).element_size(),
    )
