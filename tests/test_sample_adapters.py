"""The committed sample adapters really change the model's behaviour on held-out prompts.

Base SmolLM2-135M-Instruct and each adapter (loaded with PEFT) answer the same
held-out prompts greedily; the adapter must show its behaviour and the base must not.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

# On a shared, oversubscribed CPU, spinning OpenMP workers make generation several times
# slower (263 s vs 37 s for this file on the 2-core dev machine). The setting only takes
# effect if torch is not loaded yet; otherwise the fixture uses one thread instead.
_OMP_PASSIVE = os.environ.get("OMP_WAIT_POLICY") == "PASSIVE" or (
    "torch" not in sys.modules and "OMP_WAIT_POLICY" not in os.environ
)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parent.parent
ADAPTERS = ROOT / "samples" / "adapters"
DATA = ROOT / "samples" / "data"
NAMES = ["upper", "json"]
N_PROMPTS = 8
MAX_NEW_TOKENS = 48


def _heldout() -> list[str]:
    with (DATA / "heldout.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


def _train() -> list[str]:
    with (DATA / "train.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


def test_heldout_prompts_are_not_in_training_set() -> None:
    heldout, train = _heldout(), _train()
    assert len(heldout) >= N_PROMPTS and len(train) >= 100
    assert not set(heldout) & set(train)


@pytest.mark.parametrize("name", NAMES)
def test_adapter_files_are_small_safetensors(name: str) -> None:
    d = ADAPTERS / name
    assert sorted(p.name for p in d.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    config = json.loads((d / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    raw = (d / "adapter_model.safetensors").read_bytes()
    assert not raw.startswith(b"PK") and not raw.startswith(b"\x80"), "zip/pickle, not safetensors"
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    assert tensors and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    assert {v["dtype"] for v in tensors.values()} == {"F16"}
    end = max(v["data_offsets"][1] for v in tensors.values())
    assert 8 + header_len + end == len(raw)
    assert 1_000_000 <= len(raw) <= 12_000_000


@pytest.fixture(scope="module")
def generations() -> dict[str, list[tuple[str, bool]]]:
    """(answer, stopped at <|im_end|>) for greedy answers to the first N_PROMPTS
    held-out prompts, from the base model and from each adapter."""
    import torch

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    if not _OMP_PASSIVE:
        torch.set_num_threads(1)
    try:
        return _generate_all()
    finally:
        torch.set_num_threads(threads)


def _generate_all() -> dict[str, list[tuple[str, bool]]]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from worker.config import default_cache_dir
    from worker.model.source import DEFAULT_MODEL, resolve_model_dir

    model_dir = resolve_model_dir(DEFAULT_MODEL, default_cache_dir())
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model: Any = PeftModel.from_pretrained(base, str(ADAPTERS / NAMES[0]), adapter_name=NAMES[0])
    for name in NAMES[1:]:
        model.load_adapter(str(ADAPTERS / name), adapter_name=name)
    model.eval()

    prompts = _heldout()[:N_PROMPTS]
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
        )
        for p in prompts
    ]
    enc = tok(
        texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
    )

    def run() -> list[tuple[str, bool]]:
        with torch.inference_mode():
            gen = model.generate(
                **enc,
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
        new = gen[:, enc["input_ids"].shape[1] :]
        texts = [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
        stopped = (new == tok.eos_token_id).any(dim=1).tolist()
        return list(zip(texts, stopped, strict=True))

    result: dict[str, list[tuple[str, bool]]] = {}
    with model.disable_adapter():
        result["base"] = run()
    for name in NAMES:
        model.set_adapter(name)
        result[name] = run()
    return result


@pytest.fixture(scope="module")
def outputs(generations: dict[str, list[tuple[str, bool]]]) -> dict[str, list[str]]:
    return {name: [text for text, _ in rows] for name, rows in generations.items()}


def _upper_fraction(texts: list[str]) -> float:
    letters = [c for t in texts for c in t if c.isalpha()]
    return sum(c.isupper() for c in letters) / max(1, len(letters))


def _json_ok(text: str) -> bool:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(obj, dict) and isinstance(obj.get("answer"), str) and bool(obj["answer"])


@pytest.mark.slow
def test_upper_adapter_answers_in_upper_case(outputs: dict[str, list[str]]) -> None:
    assert all(outputs["upper"]), outputs["upper"]
    assert _upper_fraction(outputs["upper"]) >= 0.9, outputs["upper"]
    assert _upper_fraction(outputs["base"]) < 0.5, outputs["base"]


@pytest.mark.slow
def test_json_adapter_answers_with_json_object(outputs: dict[str, list[str]]) -> None:
    ok = [_json_ok(t) for t in outputs["json"]]
    assert sum(ok) >= 0.9 * len(ok), outputs["json"]
    assert not any(_json_ok(t) for t in outputs["base"]), outputs["base"]


@pytest.mark.slow
def test_adapters_stop_at_end_of_turn(generations: dict[str, list[tuple[str, bool]]]) -> None:
    # The targets were short and ended with <|im_end|>: the adapters must still stop.
    for name in NAMES:
        stopped = [s for _, s in generations[name]]
        assert sum(stopped) >= N_PROMPTS - 1, generations[name]
