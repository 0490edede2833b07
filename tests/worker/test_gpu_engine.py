"""The engine on CUDA (gpu marker): the Triton path's greedy tokens equal the CPU reference,
and no step mixes devices. Imports stay light: `make gpu-check` runs this on a bare host."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from adapter_store.basemodel import BaseModelSpec
from tests.adapter_store.builders import write_lora
from tests.worker.test_device_placement import OnDevice
from worker.config import EngineConfig
from worker.engine import Engine
from worker.model.forward_batch import ForwardBatch
from worker.sequence import SamplingParams

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19], [20, 21, 22, 23]]


@pytest.fixture
def adapters(tmp_path: Path, tiny_model: Callable[..., Path]) -> tuple[Path, dict[str, Path]]:
    base = tiny_model("llama")
    spec = BaseModelSpec.from_hf_dir(base)
    return base, {
        "r4": write_lora(tmp_path / "r4", spec, seed=1, r=4, targets=ALL, lora_alpha=8),
        "r16": write_lora(tmp_path / "r16", spec, seed=2, r=16, targets=("q_proj", "down_proj")),
    }


def run(base: Path, adapters: dict[str, Path], device: str) -> list[list[int]]:
    engine = Engine.from_config(EngineConfig(model=str(base), device=device, dtype="float32"))
    for name, path in adapters.items():
        engine.register_adapter(name, path)
    sampling = SamplingParams(max_tokens=8, ignore_eos=True)
    names: list[str | None] = ["r4", None, "r16", "r4"]
    return [r.token_ids for r in engine.generate(PROMPTS, sampling, names)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tokens_equal_the_cpu_reference(adapters: tuple[Path, dict[str, Path]]) -> None:
    base, paths = adapters
    assert run(base, paths, "cuda") == run(base, paths, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_step_never_mixes_devices(adapters: tuple[Path, dict[str, Path]]) -> None:
    base, paths = adapters
    # eager: a replayed graph's kernels bypass torch's dispatch, which OnDevice watches
    config = EngineConfig(model=str(base), device="cuda", dtype="float32", cuda_graphs=False)
    engine = Engine.from_config(config)
    for name, path in paths.items():
        engine.register_adapter(name, path)
    seeded = SamplingParams(temperature=0.7, seed=5, max_tokens=4)
    for i, adapter in enumerate(["r4", None, "r16"]):
        engine.add_request(f"q{i}", PROMPTS[i], seeded, adapter)
    check = OnDevice(torch.device("cuda", torch.cuda.current_device()))
    with check:
        while engine.has_unfinished():
            engine.step()
    assert check.device_ops > 100


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decode_steps_give_the_eager_logits(
    adapters: tuple[Path, dict[str, Path]],
) -> None:
    """Every replayed decode step against the same step run eagerly (its K/V writes are
    the same, so running both is harmless). Not bit-identical: a graph's attention splits
    its context for max_model_len, and rows sharing an adapter run BGMV, not SGMV."""
    base, paths = adapters
    engine = Engine.from_config(EngineConfig(model=str(base), device="cuda", dtype="float32"))
    for name, path in paths.items():
        engine.register_adapter(name, path)
    graphs = engine.runner.graphs
    assert graphs is not None
    replay, errors = graphs.run, []

    def checked(batch: ForwardBatch) -> torch.Tensor | None:
        got = replay(batch)
        if got is not None:
            want = engine.model.forward(batch, engine.runner.kv)
            errors.append(float((got - want).abs().max() / want.abs().max()))
        return got

    graphs.run = checked  # type: ignore[method-assign]
    # lengths differ: decode batches of 4, 3 (padded to bucket 4), 2 and 1 rows, so several
    # graphs share the memory pool and padding rows write the scratch page
    for i, (adapter, new) in enumerate(zip(["r4", None, "r16", "r4"], [8, 5, 3, 2], strict=True)):
        engine.add_request(
            f"g{i}", PROMPTS[i], SamplingParams(max_tokens=new, ignore_eos=True), adapter
        )
    while engine.has_unfinished():
        engine.step()
    assert graphs.stats.failure is None
    assert graphs.stats.replays == len(errors) > 0
    assert {1, 2, 4} <= {size for size, _ in graphs.stats.keys}
    assert any(rank for _, rank in graphs.stats.keys)  # graphs with LoRA ran
    assert max(errors) < 1e-4  # float32: summation order only
