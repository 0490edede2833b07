"""The engine: requests in, token events out, one continuous-batching step at a time.

    step():  load adapters for what may run → schedule → run the model → sample,
             detokenize, check stops → events

Everything the step needs is owned here and passed down; nothing is global.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from worker.config import EngineConfig
from worker.detokenizer import Detokenizer
from worker.lora.adapter import AdapterLoadError, load_adapter
from worker.lora.manager import AdapterManager
from worker.memory.block_manager import BlockManager
from worker.memory.page_pool import PagePool
from worker.model.llama import LlamaModel
from worker.model.loader import load_model, load_tokenizer, resolve_dtype
from worker.model.source import resolve_model_dir
from worker.runner import ModelRunner
from worker.sampling import sample
from worker.scheduler import Scheduler, SchedulerLimits
from worker.sequence import FinishReason, SamplingParams, ScheduledSeq, Sequence, TokenEvent

Prompt = str | list[int] | list[dict[str, str]]


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    adapters_loaded: int
    free_pages: int
    preemptions: int


@dataclass
class _Live:
    seq: Sequence
    detok: Detokenizer


class Engine:
    def __init__(self, config: EngineConfig, model: LlamaModel, tokenizer: Any) -> None:
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        num_pages = config.num_pages or pages_for_budget(model, config)
        self.pool = PagePool(num_pages)
        self.scheduler = Scheduler(
            BlockManager(self.pool, config.page_size),
            SchedulerLimits(config.max_num_seqs, config.max_batch_tokens),
        )
        self.runner = ModelRunner(
            model, model.allocate_kv(num_pages * config.page_size), config.page_size
        )
        loader = partial(
            load_adapter,
            model=model.config,
            device=model.device,
            dtype=model.dtype,
            max_rank=config.max_lora_rank,
        )
        self.adapters = AdapterManager(loader, config.max_adapters)
        self.max_len = min(config.max_model_len, num_pages * config.page_size)
        self.eos_ids = _eos_ids(model, tokenizer)
        self._live: dict[str, _Live] = {}
        self._pending: list[TokenEvent] = []
        self._arrivals = itertools.count()

    @classmethod
    def from_config(cls, config: EngineConfig) -> Engine:
        model_dir = resolve_model_dir(config.model, config.cache_dir)
        device = torch.device(config.device)
        model = load_model(model_dir, device, resolve_dtype(config.dtype, device))
        return cls(config, model, load_tokenizer(model_dir))

    # -- requests ---------------------------------------------------------------

    def register_adapter(self, adapter_id: str, source: Path) -> None:
        """Make an adapter (PEFT directory or registry blob) known; it loads on first use."""
        self.adapters.register(adapter_id, Path(source))

    def add_request(
        self,
        request_id: str,
        prompt: Prompt,
        sampling: SamplingParams,
        adapter_id: str | None = None,
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
        self._live[request_id] = _Live(seq, Detokenizer(self.tokenizer, ids, sampling.stop))
        self.scheduler.add(seq)

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
        events, self._pending = self._pending, []
        events += self._load_adapters()
        batch = self.scheduler.schedule()
        if batch:
            ordered, logits = self.runner.run(batch, self.adapters.get)
            events += self._postprocess(ordered, logits)
        return events

    def has_unfinished(self) -> bool:
        return bool(self._live or self._pending)

    def num_free_pages(self) -> int:
        return self.pool.num_free

    def stats(self) -> EngineStats:
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            adapters_loaded=len(self.adapters.loaded),
            free_pages=self.pool.num_free,
            preemptions=self.scheduler.num_preemptions,
        )

    def _load_adapters(self) -> list[TokenEvent]:
        """Load the adapters of everything that may run this step; fail only their requests."""
        candidates = self.scheduler.running + list(
            itertools.islice(self.scheduler.waiting, self.config.max_num_seqs)
        )
        pinned = {s.adapter_id for s in candidates if s.adapter_id is not None}
        events = []
        for seq in candidates:
            if seq.adapter_id is None or seq.request_id not in self._live:
                continue
            try:
                self.adapters.ensure(seq.adapter_id, pinned)
            except AdapterLoadError as exc:
                live = self._live[seq.request_id]
                events.append(self._finish(live, [], "", FinishReason.ERROR, str(exc)))
        return events

    def _postprocess(self, ordered: list[ScheduledSeq], logits: torch.Tensor) -> list[TokenEvent]:
        sampling = [item.seq for item in ordered if item.samples]
        for item in ordered:
            item.seq.num_computed += item.num_tokens
        tokens = sample(
            logits, [s.sampling for s in sampling], [len(s.output_ids) for s in sampling]
        )
        return [self._append(seq, token) for seq, token in zip(sampling, tokens, strict=True)]

    def _append(self, seq: Sequence, token: int) -> TokenEvent:
        live = self._live[seq.request_id]
        seq.output_ids.append(token)
        if token in self.eos_ids and not seq.sampling.ignore_eos:
            return self._finish(live, [token], live.detok.flush(), FinishReason.STOP)
        text, stopped = live.detok.add(token)
        if stopped:
            return self._finish(live, [token], text, FinishReason.STOP)
        if len(seq.output_ids) >= seq.sampling.max_tokens or seq.num_tokens >= self.max_len:
            return self._finish(live, [token], text + live.detok.flush(), FinishReason.LENGTH)
        return self._event(seq, [token], text, None)

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


def pages_for_budget(model: LlamaModel, config: EngineConfig) -> int:
    """How many KV pages fit in config.kv_cache_mb (K and V, every layer)."""
    c = model.config
    itemsize = torch.empty((), dtype=model.dtype).element_size()
    page_bytes = config.page_size * c.num_layers * 2 * c.kv_size * itemsize
    return max(1, config.kv_cache_mb * 2**20 // page_bytes)


def _eos_ids(model: LlamaModel, tokenizer: Any) -> frozenset[int]:
    ids = set(model.config.eos_token_ids)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    path = Path(getattr(tokenizer, "name_or_path", "")) / "generation_config.json"
    if path.is_file():
        eos = json.loads(path.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return frozenset(ids)
