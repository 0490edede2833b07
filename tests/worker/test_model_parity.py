"""Our forward pass against HF transformers on the same weights."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from worker.config import EngineConfig
from worker.engine import Engine
from worker.sequence import SamplingParams

# fp32 on the CPU: the two implementations differ only in summation order.
LOGIT_ATOL = 2e-4


def record_logits(engine: Engine) -> dict[str, list[torch.Tensor]]:
    """Spy on the runner: the logits row each request sampled from, step by step."""
    seen: dict[str, list[torch.Tensor]] = {}
    run = engine.runner.run

    def spy(batch: Any, adapter_of: Any) -> Any:
        ordered, logits = run(batch, adapter_of)
        rows = [item.seq.request_id for item in ordered if item.samples]
        for rid, row in zip(rows, logits, strict=True):
            seen.setdefault(rid, []).append(row.clone())
        return ordered, logits

    engine.runner.run = spy  # type: ignore[method-assign]
    return seen


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_tiny_models_match_hf_logits(model_type: str, tiny_model: Callable[..., Path]) -> None:
    overrides = (
        {"rope_scaling": {"rope_type": "linear", "factor": 2.0}} if model_type == "llama" else {}
    )
    path = tiny_model(model_type, **overrides)
    # A small token budget forces chunked prefill beside decodes.
    engine = Engine.from_config(EngineConfig(model=str(path), max_batch_tokens=24, page_size=4))
    seen = record_logits(engine)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 49152, (n,), generator=gen).tolist() for n in (5, 17, 40)]
    results = engine.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True))
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    for i, (prompt, result) in enumerate(zip(prompts, results, strict=True)):
        full = torch.tensor([prompt + result.token_ids])
        with torch.no_grad():
            ref = hf(full).logits[0, len(prompt) - 1 : -1]  # [6, vocab]
        ours = torch.stack(seen[f"generate-{i}"])
        assert ours.shape == ref.shape
        torch.testing.assert_close(ours, ref, atol=LOGIT_ATOL, rtol=0)


def test_mistral_sliding_window_matches_hf(tiny_model: Callable[..., Path]) -> None:
    path = tiny_model("mistral", sliding_window=8)
    engine = Engine.from_config(EngineConfig(model=str(path), page_size=4))
    seen = record_logits(engine)
    prompt = list(range(100, 130))  # longer than the window
    result = engine.generate([prompt], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + result.token_ids])).logits[0, len(prompt) - 1 : -1]
    torch.testing.assert_close(torch.stack(seen["generate-0"]), ref, atol=LOGIT_ATOL, rtol=0)


def test_qwen2_has_qkv_bias(tiny_model: Callable[..., Path]) -> None:
    engine = Engine.from_config(EngineConfig(model=str(tiny_model("qwen2"))))
    assert all(layer.qkv_bias is not None for layer in engine.model.layers)


PROMPTS = [
    [{"role": "user", "content": "Explain how photosynthesis works."}],
    [{"role": "user", "content": "Write a short story about a dragon."}],
    [{"role": "user", "content": "Describe the history of Rome."}],
    [{"role": "user", "content": "What is the capital of France?"}],
    "The quick brown fox",
]


@pytest.mark.slow
def test_smollm2_greedy_matches_hf_generate(smollm2_engine: Engine, hf_smollm2: Any) -> None:
    results = smollm2_engine.generate(PROMPTS, SamplingParams(max_tokens=32))
    for prompt, result in zip(PROMPTS, results, strict=True):
        ids = smollm2_engine.encode(prompt)
        with torch.no_grad():
            ref = hf_smollm2.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)
        assert result.token_ids == ref[0, len(ids) :].tolist(), f"prompt {prompt!r}"
    assert sum(len(r.token_ids) == 32 for r in results) >= 4  # most run the full 32 tokens
