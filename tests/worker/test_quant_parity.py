"""SmolLM2-135M with an NF4 base and unmerged adapters: our worker against PEFT applying the
same adapters on a transformers + bitsandbytes NF4 model of the same weights (CPU)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from tests.bnb_reference import without_cpu_bf16_kernel
from tests.worker.adapters import make_adapter
from tests.worker.test_model_parity import record_logits
from worker.config import EngineConfig
from worker.engine import Engine
from worker.model.quant_bnb import Linear4bit
from worker.sequence import SamplingParams

ADAPTERS: dict[str, dict[str, Any]] = {
    "r8-all": dict(r=8, alpha=16, std=0.02),
    "r16-attn": dict(r=16, alpha=8, targets=["q_proj", "k_proj", "v_proj", "o_proj"], std=0.03),
}
PROMPTS = [
    [{"role": "user", "content": "Tell me about the moon."}],
    [{"role": "user", "content": "Why is the sky blue?"}],
]
NEW_TOKENS = 12
# Both sides run the same bitsandbytes matmuls on the same NF4 codes in float32; what is
# left is summation order in attention, norms and LoRA over 30 layers (measured: at most
# 5.1e-5 on logits up to 34 in magnitude).
LOGIT_ATOL = 5e-4


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("nf4-adapters")
    return {
        name: make_adapter(smollm2_dir, root / name, seed=10 + i, **kwargs)
        for i, (name, kwargs) in enumerate(ADAPTERS.items())
    }


@pytest.fixture(scope="module")
def peft_nf4(smollm2_dir: Path, adapter_dirs: dict[str, Path]) -> Any:
    nf4 = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    base = without_cpu_bf16_kernel(
        AutoModelForCausalLM.from_pretrained(
            str(smollm2_dir), quantization_config=nf4, device_map="cpu", dtype=torch.float32
        )
    )
    names = list(adapter_dirs)
    model = PeftModel.from_pretrained(base, str(adapter_dirs[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapter_dirs[name]), adapter_name=name)
    return model.eval()


def peft_logits(model: Any, adapter: str | None, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab] with `adapter` alone (None: adapters disabled)."""
    if adapter is not None:
        model.set_adapter(adapter)
    alone = model.disable_adapter() if adapter is None else contextlib.nullcontext()
    with torch.no_grad(), alone:
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.slow
def test_nf4_base_with_adapters_matches_peft_on_bnb_nf4(
    smollm2_dir: Path, peft_nf4: Any, adapter_dirs: dict[str, Path]
) -> None:
    engine = Engine.from_config(EngineConfig(model=str(smollm2_dir), quantize="nf4"))
    assert all(isinstance(layer.gate_up, Linear4bit) for layer in engine.model.layers)
    for name, path in adapter_dirs.items():
        engine.register_adapter(name, path)
    seen = record_logits(engine)
    # Every adapter with each prompt, plus base-model rows, in one mixed batch.
    jobs = [(p, a) for a in [*adapter_dirs, None] for p in PROMPTS]
    results = engine.generate(
        [p for p, _ in jobs],
        SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True),
        [a for _, a in jobs],
    )
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    for i, ((prompt, adapter), result) in enumerate(zip(jobs, results, strict=True)):
        ids = engine.encode(prompt)
        ref = peft_logits(peft_nf4, adapter, ids + result.token_ids)[len(ids) - 1 : -1]
        assert result.token_ids == ref.argmax(-1).tolist(), (adapter, tok.decode(result.token_ids))
        torch.testing.assert_close(torch.stack(seen[f"generate-{i}"]), ref, atol=LOGIT_ATOL, rtol=0)
