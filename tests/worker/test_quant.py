"""Quantized base projections (bitsandbytes) on tiny models: layout, parity with
transformers' bnb layers, pre-quantized checkpoints, bytes, and the refusals."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bitsandbytes.functional as bnbf
import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from tests.bnb_reference import without_cpu_bf16_kernel
from tests.worker.test_model_parity import LOGIT_ATOL, record_logits
from worker.config import EngineConfig
from worker.engine import Engine
from worker.model.linear import DenseLinear
from worker.model.loader import load_model, weight_bytes
from worker.model.quant import NotQuantizableError, UnsupportedQuantizationError
from worker.model.quant_bnb import Linear4bit, Linear8bit
from worker.sequence import SamplingParams

CPU = torch.device("cpu")
BNB: dict[str, BitsAndBytesConfig] = {
    "nf4": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    ),
    "fp4": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32
    ),
    "int8": BitsAndBytesConfig(load_in_8bit=True),
}


def hf_quantized(path: Path, config: BitsAndBytesConfig) -> Any:
    model = AutoModelForCausalLM.from_pretrained(
        str(path), quantization_config=config, device_map="cpu", dtype=torch.float32
    )
    return without_cpu_bf16_kernel(model).eval()


def compare_to_hf(engine: Engine, hf: Any) -> None:
    """Greedy tokens and every sampled logits row of the engine against `hf` (teacher-forced):
    the same bnb calls on the same codes, so the fp32 tolerance of the dense parity test."""
    seen = record_logits(engine)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 49152, (n,), generator=gen).tolist() for n in (5, 19)]
    results = engine.generate(prompts, SamplingParams(max_tokens=5, ignore_eos=True))
    for i, (prompt, result) in enumerate(zip(prompts, results, strict=True)):
        with torch.no_grad():
            ref = hf(torch.tensor([prompt + result.token_ids])).logits[0, len(prompt) - 1 : -1]
        assert result.token_ids == ref.argmax(-1).tolist()
        torch.testing.assert_close(torch.stack(seen[f"generate-{i}"]), ref, atol=LOGIT_ATOL, rtol=0)


def compare_prefill_to_hf(engine: Engine, hf: Any) -> None:
    """int8: LLM.int8() takes its 16-bit outlier columns from every row of a matmul's input,
    so outputs depend on what shares the batch. A prompt prefilled alone is the very matmul
    HF runs on it: its logits match to the fp32 tolerance."""
    seen = record_logits(engine)
    gen = torch.Generator().manual_seed(1)
    for n in (5, 19, 40):
        prompt = torch.randint(3, 49152, (n,), generator=gen).tolist()
        engine.generate([prompt], SamplingParams(max_tokens=1, ignore_eos=True))
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0, -1]
        torch.testing.assert_close(seen["generate-0"][-1], ref, atol=LOGIT_ATOL, rtol=0)


# -- the fused layout -------------------------------------------------------------


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_of_the_concatenation_is_the_concatenation_of_4bit(quant_type: str) -> None:
    """Rows of whole 64-value blocks: quantizing q‖k‖v at once equals quantizing each."""
    gen = torch.Generator().manual_seed(0)
    parts = [torch.randn(out, 576, generator=gen) for out in (576, 192, 192)]  # SmolLM2 q, k, v
    whole, whole_state = bnbf.quantize_4bit(torch.cat(parts), quant_type=quant_type)
    alone = [bnbf.quantize_4bit(p, quant_type=quant_type) for p in parts]
    assert torch.equal(whole, torch.cat([packed for packed, _ in alone]))
    assert torch.equal(whole_state.absmax, torch.cat([s.absmax for _, s in alone]))
    fused = Linear4bit.concat([Linear4bit(p, s, torch.float32) for p, s in alone])
    assert torch.equal(fused.packed, whole)
    x = torch.randn(3, 576, generator=gen)
    expected = x @ bnbf.dequantize_4bit(whole, whole_state).t()
    torch.testing.assert_close(fused(x), expected, atol=1e-5, rtol=1e-5)


def test_rows_that_split_a_block_break_the_equality() -> None:
    """The counter-case the loader refuses: 96-value rows put one block across two rows."""
    gen = torch.Generator().manual_seed(0)
    parts = [torch.randn(3, 96, generator=gen), torch.randn(5, 96, generator=gen) * 10]
    whole, whole_state = bnbf.quantize_4bit(torch.cat(parts), quant_type="nf4")
    alone = [bnbf.quantize_4bit(p, quant_type="nf4") for p in parts]
    assert whole_state.absmax.numel() != sum(s.absmax.numel() for _, s in alone)
    assert not torch.equal(whole, torch.cat([packed for packed, _ in alone]))


def test_int8_of_the_concatenation_is_the_concatenation_of_int8() -> None:
    gen = torch.Generator().manual_seed(0)
    parts = [torch.randn(out, 96, generator=gen).half() for out in (64, 32, 32)]
    codes, scales, _ = bnbf.int8_vectorwise_quant(torch.cat(parts))
    alone = [bnbf.int8_vectorwise_quant(p)[:2] for p in parts]
    fused = Linear8bit.concat([Linear8bit(c, s, torch.float32, 6.0) for c, s in alone])
    assert torch.equal(fused.codes, codes) and torch.equal(fused.scales, scales)


# -- parity with transformers' bitsandbytes layers --------------------------------


@pytest.mark.parametrize(
    ("model_type", "quantize"),
    [("llama", "nf4"), ("llama", "fp4"), ("llama", "int8"), ("qwen2", "nf4")],
)
def test_tiny_quantized_model_matches_hf_bnb(
    model_type: str, quantize: str, tiny_model: Callable[..., Path]
) -> None:
    path = tiny_model(model_type)
    engine = Engine.from_config(EngineConfig(model=str(path), quantize=quantize, page_size=4))
    kinds = {type(layer.qkv) for layer in engine.model.layers}
    assert kinds == {Linear8bit if quantize == "int8" else Linear4bit}
    if model_type == "qwen2":  # the q/k/v bias rides in the fused quantized layer
        assert all(layer.qkv_bias is not None for layer in engine.model.layers)
    compare = compare_prefill_to_hf if quantize == "int8" else compare_to_hf
    compare(engine, hf_quantized(path, BNB[quantize]))


@pytest.mark.parametrize("double_quant", [False, True])
def test_prequantized_checkpoint_serves_as_stored(
    double_quant: bool, tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    """A directory transformers saved 4-bit (QLoRA's double quantization or not) loads as is."""
    path = tiny_model("llama")
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_use_double_quant=double_quant,
    )
    hf = hf_quantized(path, config)
    saved = tmp_path / "saved-nf4"
    hf.save_pretrained(str(saved))
    for extra in ("tokenizer.json", "tokenizer_config.json"):
        (saved / extra).write_bytes((path / extra).read_bytes())
    engine = Engine.from_config(EngineConfig(model=str(saved), page_size=4))
    assert engine.model.config.quantization == "nf4"
    assert all(isinstance(layer.down, Linear4bit) for layer in engine.model.layers)
    compare_to_hf(engine, hf)
    with pytest.raises(NotQuantizableError, match="stored as nf4.*cannot be re-quantized"):
        load_model(saved, CPU, torch.float32, "int8")


def test_int8_prequantized_checkpoint(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    path = tiny_model("llama")
    hf = hf_quantized(path, BNB["int8"])
    hf.save_pretrained(str(tmp_path / "saved-int8"))
    ours = load_model(tmp_path / "saved-int8", CPU, torch.float32)
    fresh = load_model(path, CPU, torch.float32, "int8")
    for a, b in zip(ours.layers, fresh.layers, strict=True):
        assert isinstance(a.gate_up, Linear8bit) and isinstance(b.gate_up, Linear8bit)
        assert torch.equal(a.gate_up.codes, b.gate_up.codes)
        assert torch.equal(a.gate_up.scales, b.gate_up.scales)


# -- the memory report -------------------------------------------------------------


def test_weight_bytes_per_quantization(tiny_model: Callable[..., Path]) -> None:
    path = tiny_model("llama")
    models = {q: load_model(path, CPU, torch.float32, q) for q in (None, "int8", "nf4")}
    sizes = {q: weight_bytes(m) for q, m in models.items()}
    dense = models[None]
    projections = sum(
        layer_params(layer.qkv) + layer_params(layer.o) + layer_params(layer.gate_up)
        + layer_params(layer.down)
        for layer in dense.layers
    )  # fmt: skip
    rest = sizes[None] - 4 * projections
    # nf4: half a byte a value, a float32 absmax a 64-value block, the 16-entry code per layer.
    fused_layers = 4 * len(dense.layers)
    assert sizes["nf4"] == rest + projections // 2 + projections // 64 * 4 + fused_layers * 64
    # int8: a byte a value and a float32 scale per row.
    rows = sum(
        layer.qkv.out_features + layer.o.out_features + layer.gate_up.out_features
        + layer.down.out_features
        for layer in dense.layers
    )  # fmt: skip
    assert sizes["int8"] == rest + projections + rows * 4
    assert sizes["nf4"] < sizes["int8"] < sizes[None]


def layer_params(layer: Any) -> int:
    assert isinstance(layer, DenseLinear)
    return layer.weight.numel()


# -- refusals ------------------------------------------------------------------------


def test_unsupported_quantization_name() -> None:
    with pytest.raises(UnsupportedQuantizationError, match="'nf8'.*nf4, fp4, int8"):
        EngineConfig(quantize="nf8")
    with pytest.raises(ValueError, match="compute_dtype must be auto"):
        EngineConfig(quantize="nf4", compute_dtype="float64")


def test_layers_bitsandbytes_cannot_quantize(tiny_model: Callable[..., Path]) -> None:
    """Rows of 96 values hold no whole number of 64-value 4-bit blocks: refused by name."""
    path = tiny_model("llama", hidden_size=96, num_attention_heads=6, num_key_value_heads=2)
    with pytest.raises(NotQuantizableError, match=r"model\.layers\.0\.self_attn\.q_proj.*96"):
        load_model(path, CPU, torch.float32, "nf4")
    assert isinstance(load_model(path, CPU, torch.float32, "int8").layers[0].o, Linear8bit)


def test_checkpoint_quantized_by_another_method(tiny_model: Callable[..., Path]) -> None:
    path = tiny_model("llama")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(NotQuantizableError, match="quantized with gptq"):
        load_model(path, CPU, torch.float32, "nf4")
