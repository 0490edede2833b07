"""The whole model through the Triton kernels (interpreted on the CPU) gives the reference
path's greedy tokens: base rows and adapters of different ranks in one batch, prefill and
decode, the kernels reading adapter rows and KV blocks straight from the page pool."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from adapter_store.basemodel import BaseModelSpec
from tests.adapter_store.builders import write_lora
from worker.config import EngineConfig
from worker.engine import Engine
from worker.sequence import SamplingParams

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19], [20, 21, 22, 23]]


def triton_engine(base: Path) -> Engine:
    from worker.model.ops import OPS

    engine = Engine.from_config(EngineConfig(model=str(base), page_size=4))
    engine.model.ops = OPS["cuda"]()  # the kernel path, interpreted here
    engine.runner.paged = True
    return engine


def test_greedy_tokens_through_the_kernels_equal_the_reference(
    tmp_path: Path, tiny_model: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.kernels import bgmv, paged_attention, sgmv

    launches: dict[str, int] = {}
    for module, name in (
        (sgmv, "sgmv_shrink"),
        (bgmv, "bgmv_shrink"),
        (paged_attention, "decode_attention"),
        (paged_attention, "varlen_attention"),
    ):
        real = getattr(module, name)

        def counted(
            *a: object, _real: Callable[..., object] = real, _n: str = name, **k: object
        ) -> object:
            launches[_n] = launches.get(_n, 0) + 1
            return _real(*a, **k)

        monkeypatch.setattr(module, name, counted)
    base = tiny_model("llama", hidden_size=32, intermediate_size=64)
    spec = BaseModelSpec.from_hf_dir(base)
    adapters = {
        "r2": write_lora(tmp_path / "r2", spec, seed=1, r=2, targets=ALL, lora_alpha=4),
        "r5": write_lora(tmp_path / "r5", spec, seed=2, r=5, targets=("q_proj", "down_proj")),
        "r8": write_lora(tmp_path / "r8", spec, seed=3, r=8, targets=ALL, lora_alpha=2),
    }
    names: list[str | None] = ["r2", None, "r5", "r8"]
    sampling = SamplingParams(max_tokens=5, ignore_eos=True)
    outputs = []
    for engine in (
        Engine.from_config(EngineConfig(model=str(base), page_size=4)),
        triton_engine(base),
    ):
        for name, path in adapters.items():
            engine.register_adapter(name, path)
        outputs.append([r.token_ids for r in engine.generate(PROMPTS, sampling, names)])
    reference, kernels = outputs
    assert kernels == reference
    assert set(launches) == {"sgmv_shrink", "bgmv_shrink", "decode_attention", "varlen_attention"}
    assert len({tuple(t) for t in reference}) == len(PROMPTS)  # the rows really differ
