"""Decode graphs (worker/decode_graphs.py) on the CPU: everything but the CUDA capture.

The engine runs the Triton kernels through the interpreter with its decode steps served
from static inputs (Replay.EAGER runs what a CUDA graph would replay); its greedy tokens
must equal the reference path's while batches shrink across buckets, rows are padded,
adapters of different ranks and base rows mix, adapter tables change and grow, and steps
that do not fit fall back to eager. The capture itself is tested under the gpu marker
(tests/worker/test_gpu_engine.py).
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from adapter_store.basemodel import BaseModelSpec
from tests.adapter_store.builders import write_lora
from tests.worker.conftest import save_tiny
from worker import decode_graphs
from worker.config import EngineConfig
from worker.decode_graphs import SCRATCH_OWNER, DecodeGraphs, Replay, buckets, rank_bound
from worker.engine import Engine
from worker.memory.allocator import PageKind
from worker.memory.pool import MemoryPool
from worker.model.llama import LlamaModel
from worker.model.ops import OPS
from worker.sequence import SamplingParams

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# (prompt, adapter, new tokens): lengths differ, so the decode batch shrinks step by step
JOBS: list[tuple[list[int], str | None, int]] = [
    ([5, 6, 7, 8, 9], "r2", 7),
    ([10, 11, 12], None, 3),
    ([13, 14, 15, 16, 17, 18, 19], "r5", 6),
    ([20, 21, 22, 23], "r8", 5),
    ([24, 25, 26, 27, 28, 29], "r2", 4),
    ([30, 31], None, 2),
]
PAGES = 256  # a small pool: one page is 1 KiB here, and a test compares it step by step
_ids = itertools.count()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> tuple:
    tmp = tmp_path_factory.mktemp("graphs")
    base = save_tiny(tmp, smollm2_dir, "llama", 0, hidden_size=32, intermediate_size=64)
    spec = BaseModelSpec.from_hf_dir(base)
    adapters = {
        "r2": write_lora(tmp / "r2", spec, seed=1, r=2, targets=ALL, lora_alpha=4),
        "r5": write_lora(tmp / "r5", spec, seed=2, r=5, targets=("q_proj", "down_proj")),
        "r8": write_lora(tmp / "r8", spec, seed=3, r=8, targets=ALL, lora_alpha=2),
    }
    return base, adapters


def serve(engine: Engine, jobs: list[tuple[list[int], str | None, int]]) -> list[list[int]]:
    """Every job's greedy tokens, all submitted at once and stepped to the end."""
    rids = [f"job-{next(_ids)}" for _ in jobs]
    for rid, (prompt, adapter, new) in zip(rids, jobs, strict=True):
        engine.add_request(rid, prompt, SamplingParams(max_tokens=new, ignore_eos=True), adapter)
    tokens: dict[str, list[int]] = {rid: [] for rid in rids}
    deadline = time.monotonic() + 600
    while engine.has_unfinished():
        for event in engine.step():
            tokens[event.request_id] += event.token_ids
        assert time.monotonic() < deadline, "the engine never finished"
    return [tokens[rid] for rid in rids]


def engines(models: tuple, **graph_args: object) -> tuple[Engine, Engine, DecodeGraphs]:
    """The reference engine, and the kernel path with decode graphs (eager replay) that the
    engine attaches itself, as it attaches CUDA ones on a GPU."""
    base, adapters = models
    config = EngineConfig(model=str(base), page_size=4, num_pages=PAGES)
    reference = Engine.from_config(config)

    def eager_graphs(model: LlamaModel, pool: MemoryPool, config: EngineConfig) -> DecodeGraphs:
        args = (config.max_num_seqs, config.max_model_len, Replay.EAGER)
        return DecodeGraphs(model, pool, *args, **graph_args)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(decode_graphs, "for_engine", eager_graphs)
        kernels = Engine.from_config(config)
    kernels.model.ops = OPS["cuda"]()  # the Triton kernels, interpreted here
    kernels.runner.paged = True
    assert kernels.runner.graphs is not None
    for engine in (reference, kernels):
        for name, path in adapters.items():
            engine.register_adapter(name, path)
    return reference, kernels, kernels.runner.graphs


def test_buckets_and_rank_bounds() -> None:
    assert buckets(1) == (1,)
    assert buckets(6) == (1, 2, 4, 6)
    assert buckets(12) == (1, 2, 4, 8, 12)
    assert buckets(64) == (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64)
    assert [rank_bound(r) for r in (0, 1, 16, 17, 48, 384)] == [0, 16, 16, 32, 64, 512]


def test_decode_graphs_give_the_reference_tokens(models: tuple) -> None:
    reference, kernels, graphs = engines(models)
    assert serve(kernels, JOBS) == serve(reference, JOBS)
    stats = graphs.stats
    assert stats.failure is None
    assert stats.replays > 0 and stats.eager > 0  # decodes replayed, prefills eager
    sizes = {size for size, _ in stats.keys}
    assert len(sizes) >= 3  # the batch shrank through several buckets
    assert any(rank for _, rank in stats.keys)  # steps with adapters
    # A second round on other adapters: the static tables are copied again, not reused.
    swap: dict[str | None, str | None] = {"r2": "r8", "r8": "r5", "r5": None, None: "r2"}
    swapped = [(p, swap[a], n) for p, a, n in JOBS]
    assert serve(kernels, swapped) == serve(reference, swapped)


def test_padding_rows_write_only_the_scratch_page(models: tuple) -> None:
    _, kernels, graphs = engines(models)
    page = graphs.scratch_page
    allocator = kernels.pool.allocator
    assert allocator.kind(page) is PageKind.KV and allocator.owner(page) == SCRATCH_OWNER
    # sequences get the other pages: a request of max_len tokens still fits beside them
    assert kernels.usable_pages == PAGES - 1 and kernels.max_len == (PAGES - 1) * 4
    sampling = SamplingParams(max_tokens=4, ignore_eos=True)
    for i, (prompt, adapter, _) in enumerate(JOBS[:3]):  # three rows: bucket 4, one padded
        kernels.add_request(f"pad-{i}", prompt, sampling, adapter)
    while graphs.stats.replays == 0:  # prefill (eager), up to the first decode step
        assert kernels.has_unfinished(), "no decode step was replayed"
        before = kernels.pool.buffer.clone()
        kernels.step()
    changed = set((kernels.pool.buffer != before).flatten(1).any(1).nonzero().flatten().tolist())
    owned = {p for p in changed if allocator.owner(p) is not None}
    assert page in changed  # the padding row wrote its K/V there
    assert changed == owned  # and no row wrote a page nobody owns
    assert all(allocator.kind(p) is PageKind.KV for p in changed)
    assert (4, 16) in graphs.stats.keys  # r2 on all of q, k and v: group rank 6


def test_batches_past_the_largest_bucket_and_failed_captures_run_eagerly(
    models: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference, kernels, graphs = engines(models)
    graphs.buckets = (1, 2)  # as if max_num_seqs were 2: wider decode steps stay eager
    want = serve(reference, JOBS)
    assert serve(kernels, JOBS) == want
    assert graphs.stats.replays > 0 and {size for size, _ in graphs.stats.keys} <= {1, 2}

    _, failing, broken = engines(models)

    class Refused:
        def __init__(self, forward: object) -> None:
            raise RuntimeError("capture refused")

    monkeypatch.setattr(decode_graphs, "_Eager", Refused)
    assert serve(failing, JOBS) == want
    assert broken.stats.failure == "RuntimeError: capture refused"
    assert broken.stats.replays == 0 and not broken.stats.keys


def test_adapter_tables_grow_and_the_graphs_reading_them_are_captured_again(
    models: tuple,
) -> None:
    reference, kernels, graphs = engines(models, row_capacity=8)
    only_r2 = [(p, None if a is None else "r2", n) for p, a, n in JOBS]
    assert serve(kernels, only_r2) == serve(reference, only_r2)
    capacity, captures, keys = (
        graphs.tables.row_addr.shape[0],
        graphs.stats.captures,
        set(graphs.stats.keys),
    )
    assert any(rank for _, rank in keys)  # LoRA graphs over the first tables
    # Three adapters need more rows: the tables move, and graphs read the new ones.
    assert serve(kernels, JOBS) == serve(reference, JOBS)
    assert graphs.tables.row_addr.shape[0] > capacity
    recaptured = graphs.stats.captures - captures - len(graphs.stats.keys - keys)
    assert recaptured > 0  # keys captured before the move were captured again


def test_the_engine_attaches_cuda_graphs_only_where_they_can_run(models: tuple) -> None:
    base, _ = models
    for config in (
        EngineConfig(model=str(base)),  # the CPU: nothing to capture
        EngineConfig(model=str(base), cuda_graphs=False),
    ):
        engine = Engine.from_config(config)
        assert engine.runner.graphs is None
        assert decode_graphs.for_engine(engine.model, engine.pool, config) is None


def test_a_base_stored_quantized_gets_no_graphs_even_without_quantize() -> None:
    # a bitsandbytes checkpoint loads quantized with EngineConfig.quantize=None; its
    # kernels are not captured, whatever the config asked for
    model = SimpleNamespace(device=torch.device("cuda"), config=SimpleNamespace(quantization="nf4"))
    config = EngineConfig(model="unused", cuda_graphs=True)
    assert config.quantize is None
    assert decode_graphs.for_engine(model, None, config) is None  # type: ignore[arg-type]
