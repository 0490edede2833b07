"""A mixed batch of many adapters against PEFT running each adapter alone."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from tests.worker.adapters import make_adapter
from worker.engine import Engine
from worker.sequence import SamplingParams

# name -> make_adapter arguments: ranks 4..64, different alphas, rsLoRA on one,
# rank/alpha patterns on one, different target-module subsets.
ADAPTERS: dict[str, dict[str, Any]] = {
    "r4-qv": dict(r=4, alpha=8, targets=["q_proj", "v_proj"]),
    "r8-all": dict(r=8, alpha=16),
    "r16-attn": dict(r=16, alpha=8, targets=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "r32-mlp": dict(r=32, alpha=64, targets=["gate_proj", "up_proj", "down_proj"]),
    "r64-rslora": dict(r=64, alpha=16, use_rslora=True, std=0.02),
    "r8-patterns": dict(
        r=8,
        alpha=16,
        rank_pattern={"q_proj": 16, "down_proj": 4},
        alpha_pattern={"o_proj": 32},
    ),
    "r12-kv": dict(r=12, alpha=24, targets=["k_proj", "v_proj", "down_proj"]),
    "r24-o-up": dict(r=24, alpha=12, targets=["o_proj", "up_proj"]),
}
PROMPTS = [
    [{"role": "user", "content": "Tell me about the moon."}],
    [{"role": "user", "content": "Why is the sky blue?"}],
]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: make_adapter(smollm2_dir, root / name, seed=i, **kwargs)
        for i, (name, kwargs) in enumerate(ADAPTERS.items())
    }


@pytest.fixture(scope="module")
def peft_model(smollm2_dir: Path, adapter_dirs: dict[str, Path]) -> Any:
    """One PEFT model holding every adapter; set_adapter picks the one to run alone."""
    base = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32)
    names = list(adapter_dirs)
    model = PeftModel.from_pretrained(base, str(adapter_dirs[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapter_dirs[name]), adapter_name=name)
    return model.eval()


def peft_greedy(
    model: Any, adapter: str | None, ids: list[int], new_tokens: int = NEW_TOKENS
) -> list[int]:
    """PEFT greedy decoding with `adapter` alone (None: adapters disabled)."""
    if adapter is not None:
        model.set_adapter(adapter)
    alone = model.disable_adapter() if adapter is None else contextlib.nullcontext()
    with torch.no_grad(), alone:
        out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False)
    return out[0, len(ids) :].tolist()


@pytest.mark.slow
def test_mixed_batch_matches_peft_alone(
    smollm2_engine: Engine, peft_model: Any, adapter_dirs: dict[str, Path]
) -> None:
    for name, path in adapter_dirs.items():
        smollm2_engine.register_adapter(name, path)
    # Every adapter with each prompt, plus base-model rows, all in one batch.
    jobs: list[tuple[str | None, Any]] = [(n, p) for n in adapter_dirs for p in PROMPTS]
    jobs += [(None, p) for p in PROMPTS]
    results = smollm2_engine.generate(
        [p for _, p in jobs], SamplingParams(max_tokens=NEW_TOKENS), [a for a, _ in jobs]
    )
    base_tokens = {}
    for (name, prompt), result in zip(jobs, results, strict=True):
        ids = smollm2_engine.encode(prompt)
        ref = peft_greedy(peft_model, name, ids)
        assert result.token_ids == ref, f"adapter {name} prompt {prompt}"
        if name is None:
            base_tokens[str(prompt)] = ref
    changed = sum(
        r.token_ids != base_tokens[str(p)] for (n, p), r in zip(jobs, results, strict=True) if n
    )
    assert changed >= len(ADAPTERS)  # the adapters really change the output


@pytest.mark.parametrize("cpu_kernels", [True, False], ids=["C kernel", "torch gathers"])
def test_one_row_per_adapter_matches_peft(
    tmp_path: Path, tiny_model: Any, cpu_kernels: bool
) -> None:
    """Decode rows of distinct adapters, each its own segment of the page pool; PEFT agrees,
    through the CPU's C kernel and through its fallback, the torch gathers."""
    from worker.config import EngineConfig

    base = tiny_model("llama")
    specs = [dict(r=4, alpha=8), dict(r=8, alpha=8), dict(r=4, alpha=16), dict(r=8, alpha=4)]
    specs += [dict(r=4, alpha=8, targets=["q_proj", "v_proj"])]
    dirs = {
        f"t{i}": make_adapter(base, tmp_path / f"t{i}", seed=i, std=0.3, **spec)
        for i, spec in enumerate(specs)
    }
    engine = Engine.from_config(EngineConfig(model=str(base), cpu_kernels=cpu_kernels))
    assert (engine.cpu_lora is not None) == cpu_kernels  # this host has a C compiler
    for name, path in dirs.items():
        engine.register_adapter(name, path)
    prompt = [5, 17, 300, 4000, 12]
    names: list[str | None] = [*dirs, None]
    results = engine.generate([prompt] * len(names), SamplingParams(max_tokens=6), names)
    hf = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model = PeftModel.from_pretrained(hf, str(dirs["t0"]), adapter_name="t0")
    for name in list(dirs)[1:]:
        model.load_adapter(str(dirs[name]), adapter_name=name)
    outputs = set()
    for name, result in zip(names, results, strict=True):
        ref = peft_greedy(model.eval(), name, prompt, new_tokens=6)
        assert result.token_ids == ref, f"adapter {name}"
        outputs.add(tuple(ref))
    assert len(outputs) >= 4  # the adapters really differ


def _round_to_bfloat16(adapter_dir: Path) -> None:
    """The adapter's weights rounded to bfloat16, saved as float32: the numbers a
    `lora_dtype=bfloat16` engine stores (its scales below are powers of two, so folding
    them into B after rounding is exact)."""
    path = adapter_dir / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16).float() for k, v in load_file(path).items()}, path)


@pytest.mark.parametrize("cpu_kernels", [True, False], ids=["C kernel", "torch gathers"])
def test_bfloat16_adapter_rows_match_peft_on_the_rounded_weights(
    tmp_path: Path, tiny_model: Any, cpu_kernels: bool
) -> None:
    """lora_dtype=bfloat16 under a float32 model: adapter rows are stored in bfloat16 in
    the float32 pool and widened as they are read, by the C kernel (decodes, short prompts),
    by the torch gathers and by the GEMMs on views (a prompt longer than the kernel takes).
    PEFT in float32 on the rounded weights gives the same greedy tokens."""
    from worker.config import EngineConfig
    from worker.runner import KERNEL_SEGMENT_ROWS

    base = tiny_model("llama")
    specs = [dict(r=4, alpha=8), dict(r=8, alpha=8), dict(r=4, alpha=16), dict(r=8, alpha=4)]
    dirs = {
        f"t{i}": make_adapter(base, tmp_path / f"t{i}", seed=i, std=0.3, **spec)
        for i, spec in enumerate(specs)
    }
    for path in dirs.values():
        _round_to_bfloat16(path)
    config = EngineConfig(model=str(base), cpu_kernels=cpu_kernels, lora_dtype="bfloat16")
    engine = Engine.from_config(config)
    assert engine.pool.lora.dtype == torch.bfloat16 and engine.pool.dtype == torch.float32
    assert (engine.cpu_lora is not None) == cpu_kernels
    for name, path in dirs.items():
        engine.register_adapter(name, path)
    short = [5, 17, 300, 4000, 12]
    long = [(7 * i + 3) % 1000 + 10 for i in range(KERNEL_SEGMENT_ROWS + 6)]
    jobs: list[tuple[str | None, list[int]]] = [(n, short) for n in dirs]
    jobs += [("t1", long), ("t2", long), (None, short)]
    results = engine.generate(
        [p for _, p in jobs], SamplingParams(max_tokens=6), [n for n, _ in jobs]
    )
    hf = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model = PeftModel.from_pretrained(hf, str(dirs["t0"]), adapter_name="t0")
    for name in list(dirs)[1:]:
        model.load_adapter(str(dirs[name]), adapter_name=name)
    outputs = set()
    for (name, prompt), result in zip(jobs, results, strict=True):
        ref = peft_greedy(model.eval(), name, prompt, new_tokens=6)
        assert result.token_ids == ref, f"adapter {name}, {len(prompt)}-token prompt"
        outputs.add(tuple(ref))
    assert len(outputs) >= 4  # the adapters really differ
