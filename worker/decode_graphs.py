"""Decode steps replayed from CUDA graphs: one captured forward per batch bucket.

A decode step of a small model on a GPU launches hundreds of small kernels (per layer:
norms, GEMMs, RoPE, KV writes, paged attention, BGMV shrink and expand), and the launches
cost more time than the bytes they read. As vLLM and SGLang do, the runner captures the
model's forward for decode-only batches once per bucket and replays it: a step copies its
inputs into static tensors, pads the rows past its own, replays, and reads its rows'
logits.

    buckets    batch sizes 1, 2, 4, 8, then multiples of 8 up to max_num_seqs; a graph
               per (bucket, rank bound), captured on first use (lazily: a worker that
               never runs 40 rows never captures 40)
    fixed      at capture: the bucket B, the block-table width (max_len / page_tokens, at
               most the pool's other pages), the LoRA rank bound (the step's largest group
               rank rounded up to a power of two ≥ 16: the shrink output's width and
               grid), the adapter tables' capacity
    per step   tokens, positions, KV slots, block tables, context lengths, each row's
               adapter slot; the slots' row tables, copied only when they change
    padding    rows n..B-1: no adapter, context length 1 over a scratch page this object
               holds (their K/V writes land there, never in a sequence's page)
    eager      prefills, verifications, batches past the largest bucket, block tables
               wider than the capture's; a capture that fails is logged with its reason
               and the runner stays eager from then on

Decode LoRA in a graph is always BGMV (one adapter per row), also where rows share an
adapter (eager SGMV runs those as segments): it reads the same tables, and shared rows
meet their adapter in L2. `Replay.EAGER` runs the same static inputs through the ops
without capturing, on any device: the tests check everything but the capture itself on
the CPU, through Triton's interpreter.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from worker.config import EngineConfig
from worker.decode_inputs import StaticInputs, StaticTables
from worker.kernels.lora_meta import LoraStepMeta
from worker.kernels.lora_ref import Segments
from worker.lora.resident import model_shape
from worker.memory.pool import MemoryPool
from worker.model.forward_batch import ForwardBatch, LoraBatch, PagedAttention
from worker.model.llama import LlamaModel

log = logging.getLogger(__name__)

SCRATCH_OWNER = "decode-graphs:padding"  # the allocator's owner of the padding rows' page
MIN_RANK_BOUND = 16
MIN_ROW_CAPACITY = 1 << 14  # adapter rows (row_addr entries) the static tables start with


class Replay(enum.Enum):
    CUDA = "cuda"  # torch.cuda.CUDAGraph: capture once, replay
    EAGER = "eager"  # the static inputs through the ops each time (no capture: tests)


def for_engine(model: LlamaModel, pool: MemoryPool, config: EngineConfig) -> DecodeGraphs | None:
    """CUDA graphs where they are asked for and can run: on CUDA, over an unquantized base
    (bitsandbytes' kernels are not captured). Built before the engine counts the pages
    sequences may use: the graphs hold one."""
    # the model's own: a checkpoint stored quantized loads quantized with quantize=None
    quantized = model.config.quantization is not None
    if not config.cuda_graphs or model.device.type != "cuda" or quantized:
        return None
    return DecodeGraphs(model, pool, config.max_num_seqs, config.max_model_len)


def buckets(max_batch: int) -> tuple[int, ...]:
    """Batch sizes captured: 1, 2, 4, 8, 16, 24, ... and max_batch itself."""
    sizes = [b for b in (1, 2, 4) if b < max_batch]
    sizes += list(range(8, max_batch, 8))
    return (*sizes, max_batch)


def rank_bound(max_rank: int) -> int:
    """A capture's LoRA rank bound for a step's largest group rank (0: no LoRA)."""
    if max_rank <= 0:
        return 0
    bound = MIN_RANK_BOUND
    while bound < max_rank:
        bound *= 2
    return bound


@dataclass
class GraphStats:
    replays: int = 0  # decode steps served by a graph
    eager: int = 0  # steps that did not fit one (prefill, verification, too wide)
    captures: int = 0
    failure: str | None = None  # why capturing failed (graphs are off from then on)
    keys: set[tuple[int, int]] = field(default_factory=set)  # (bucket, rank bound) captured


class DecodeGraphs:
    def __init__(
        self,
        model: LlamaModel,
        pool: MemoryPool,  # the model's KV cache and adapter rows
        max_batch: int,  # sequences per step (the largest bucket)
        max_len: int,  # tokens per sequence (max_model_len): the block tables' width
        replay: Replay = Replay.CUDA,
        row_capacity: int = MIN_ROW_CAPACITY,  # the adapter row table's first size
    ) -> None:
        self.model, self.kv, self.pool_lora = model, pool.kv_rows, pool.lora
        self.shape = model_shape(model.config)
        self.replay_kind = replay
        page_tokens = pool.geometry.page_tokens
        self.buckets = buckets(max_batch)
        device = model.device
        layers = model.config.num_layers
        # The padding rows' page: their K/V writes and their one-token attention stay in it.
        self.scratch_page = pool.allocator.allocate_kv(1, SCRATCH_OWNER)[0]
        self.scratch_row = self.scratch_page * layers * 2 * page_tokens  # its layer-0 K row
        # no sequence holds more pages than the rest of the pool
        self.width = min(-(-max_len // page_tokens), pool.allocator.num_free)
        self.inputs = StaticInputs.empty(max_batch, self.width, device)
        # Every graph writes its logits here: one buffer, not one held per graph.
        vocab = model.lm_head.shape[0]
        self.logits = torch.zeros(max_batch, vocab, dtype=torch.float32, device=device)
        self.inputs.block_tables[:, 0] = self.scratch_page
        self.tables = StaticTables.empty(row_capacity, max_batch, layers, device)
        self.stats = GraphStats()
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._mempool: Any = None  # the graphs' shared CUDA memory pool

    def run(self, batch: ForwardBatch) -> torch.Tensor | None:
        """The step's logits [n, vocab] from a graph; None when it must run eagerly."""
        n = int(batch.input_ids.shape[0])
        paged = batch.paged
        if (
            self.stats.failure is not None
            or paged is None
            or not paged.decode_only
            or n > self.buckets[-1]
            or n != batch.logits_index.shape[0]
            or paged.block_tables.shape[1] > self.width
        ):
            self.stats.eager += 1
            return None
        meta = batch.lora.meta if batch.lora is not None else None
        rank = 0 if meta is None else rank_bound(meta.max_rank)
        if meta is not None and rank:
            self._fit_tables(meta)
        size = next(b for b in self.buckets if b >= n)
        self._load(batch, n, size, meta if rank else None)
        graph = self._graphs.get((size, rank))
        if graph is None:
            graph = self._capture(size, rank, batch)
            if graph is None:
                self.stats.eager += 1
                return None
        self.stats.replays += 1
        return graph.replay()[:n].clone()

    def _fit_tables(self, meta: LoraStepMeta) -> None:
        """Grow the static tables past the step's rows; graphs read their addresses, so the
        ones with LoRA are dropped and captured again on use."""
        rows = int(meta.row_addr.shape[0])
        if rows <= self.tables.row_addr.shape[0]:
            return
        capacity = self.tables.row_addr.shape[0]
        while capacity < rows:
            capacity *= 2
        slots, layers = self.tables.a_row.shape[:2]
        self.tables = StaticTables.empty(capacity, slots, layers, self.model.device)
        self._graphs = {key: g for key, g in self._graphs.items() if key[1] == 0}

    def _load(self, batch: ForwardBatch, n: int, size: int, meta: LoraStepMeta | None) -> None:
        """The step's rows into the static inputs, rows n..size-1 padded."""
        s, paged = self.inputs, batch.paged
        assert paged is not None
        copies = (
            (s.input_ids, batch.input_ids, 0),
            (s.positions, batch.positions, 0),
            (s.slot_rows, batch.slot_rows, self.scratch_row),
            (s.context_lens, paged.context_lens, 1),
        )
        for static, step, pad in copies:
            static[:n].copy_(step)
            if size > n:
                static[n:size].fill_(pad)
        width = paged.block_tables.shape[1]
        s.block_tables[:n, :width].copy_(paged.block_tables)
        if size > n:
            s.block_tables[n:size, 0].fill_(self.scratch_page)
        if meta is not None:
            s.row_slot[:n].copy_(meta.row_slot)
            if size > n:
                s.row_slot[n:size].fill_(-1)
            self.tables.load(meta)

    def _static_batch(self, size: int, rank: int, like: ForwardBatch) -> ForwardBatch:
        s, paged = self.inputs, like.paged
        assert paged is not None
        lora = None
        if rank:
            t = self.tables
            meta = LoraStepMeta(
                pool=self.pool_lora,
                row_addr=t.row_addr,
                a_row=t.a_row,
                a_rank=t.a_rank,
                b_row=t.b_row,
                b_rank=t.b_rank,
                b_col=t.b_col,
                seg_start=s.seg_start[: size + 1],
                seg_slot=s.seg_slot[:size],
                row_slot=s.row_slot[:size],
                max_rank=rank,
                row_align=like.lora.meta.row_align if like.lora and like.lora.meta else 1,
            )
            segments = Segments(tuple(range(size)), tuple(range(1, size + 1)), (-1,) * size)
            out_cols = self.shape.out_cols
            lora = LoraBatch(segments, [], meta, out_cols=out_cols, decode_only=True)
        return ForwardBatch(
            input_ids=s.input_ids[:size],
            positions=s.positions[:size],
            slot_rows=s.slot_rows[:size],
            kv_layer_rows=like.kv_layer_rows,
            kv_v_rows=like.kv_v_rows,
            attention=[],
            paged=PagedAttention(
                block_tables=s.block_tables[:size],
                context_lens=s.context_lens[:size],
                cu_seqlens_q=s.cu_seqlens_q[: size + 1],
                max_query_len=1,
                decode_only=True,
                num_layers=paged.num_layers,
                window=paged.window,
            ),
            logits_index=s.logits_index[:size],
            lora=lora,
        )

    def _capture(self, size: int, rank: int, like: ForwardBatch) -> _Graph | None:
        static = self._static_batch(size, rank, like)

        def forward() -> torch.Tensor:
            out = self.logits[:size]
            out.copy_(self.model.forward(static, self.kv))
            return out

        try:
            if self.replay_kind is Replay.CUDA:
                graph: _Graph = _CudaGraph(forward, self._cuda_pool())
            else:
                graph = _Eager(forward)
        except Exception as exc:  # noqa: BLE001 (any capture failure: log it, stay eager)
            self.stats.failure = f"{type(exc).__name__}: {exc}"
            log.warning("decode graph capture failed (%s): decode steps run eagerly", exc)
            self._graphs.clear()
            return None
        self._graphs[(size, rank)] = graph
        self.stats.captures += 1
        self.stats.keys.add((size, rank))
        log.info("captured a decode graph: %d rows, LoRA rank bound %d", size, rank)
        return graph

    def _cuda_pool(self) -> Any:
        if self._mempool is None:
            self._mempool = torch.cuda.graph_pool_handle()
        return self._mempool


class _Graph(Protocol):
    def replay(self) -> torch.Tensor: ...  # the static batch's logits [B, vocab]


class _Eager:
    def __init__(self, forward: Callable[[], torch.Tensor]) -> None:
        self.forward = forward

    def replay(self) -> torch.Tensor:
        return self.forward()


class _CudaGraph:
    def __init__(self, forward: Callable[[], torch.Tensor], pool: Any) -> None:
        # Warm up on a side stream first (Triton compiles, the allocator settles), as
        # torch.cuda.graphs asks; the warm-up writes the step's own K/V, which replay
        # writes again, identically.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            forward()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: adapter loads pin host memory on other threads meanwhile, which
        # the default ("global") would refuse, failing the load and the capture
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.out = forward()

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.out
