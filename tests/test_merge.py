"""`lorapool-admin merge`: an adapter trained here on a bitsandbytes NF4 base (PEFT, CPU),
uploaded, merged plainly and the QLoRA way; each merge against the unmerged adapter on
its NF4 base; the merged directory in HF transformers and in our worker; the refusals."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, LlamaConfig

from adapter_store.quantconfig import BaseQuantization
from lorapool.admin import main
from lorapool.merge import MergeError, qlora_quantization
from tests.bnb_reference import without_cpu_bf16_kernel
from tests.worker.test_model_parity import LOGIT_ATOL, record_logits
from worker.config import EngineConfig, default_cache_dir
from worker.engine import Engine
from worker.model.source import DEFAULT_MODEL, resolve_model_dir
from worker.sequence import SamplingParams

NF4 = BitsAndBytesConfig(
    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
)
VOCAB = 49152  # the SmolLM2 tokenizer's, so our worker can load the tiny models
TARGET = 777  # the task: answer this token after any token


def tiny_base(root: Path, seed: int, hidden: int = 64) -> Path:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=2,
        bos_token_id=1,
    )
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    out = root / f"base-{seed}-{hidden}"
    model.save_pretrained(str(out))
    smollm2 = resolve_model_dir(DEFAULT_MODEL, default_cache_dir())
    AutoTokenizer.from_pretrained(str(smollm2)).save_pretrained(str(out))
    return out


def tokens(seed: int, rows: int, length: int = 16) -> torch.Tensor:  # [rows, length]
    return torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def nf4_model(base: Path) -> Any:
    return without_cpu_bf16_kernel(
        AutoModelForCausalLM.from_pretrained(
            str(base), quantization_config=NF4, device_map="cpu", dtype=torch.float32
        )
    )


def train_qlora(base: Path, out: Path, steps: int = 30) -> tuple[float, float]:
    """A rank-8 LoRA on the NF4 base, trained to answer TARGET; saved with the base's
    quantization recorded in its adapter_config.json (PEFT itself records none)."""
    torch.manual_seed(0)
    model = get_peft_model(
        nf4_model(base), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    )
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for step in range(steps):
        batch = tokens(step, 4)
        loss = model(input_ids=batch, labels=torch.full_like(batch, TARGET)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.save_pretrained(str(out))
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = json.loads(NF4.to_json_string(use_diff=False))
    config_path.write_text(json.dumps(config))
    return losses[0], losses[-1]


def mean_kl(reference: Any, candidate: Any, batch: torch.Tensor) -> float:
    """Mean over every token of KL(p_reference ‖ p_candidate)."""
    with torch.no_grad():
        p = torch.log_softmax(reference(input_ids=batch).logits.float(), -1)
        q = torch.log_softmax(candidate(input_ids=batch).logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@dataclass(frozen=True)
class Merged:
    base: Path
    adapter: Path
    flags: list[str]
    qlora: Path
    plain: Path
    losses: tuple[float, float]
    shown: dict[str, Any]


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Merged]:
    root = tmp_path_factory.mktemp("merge")
    base = tiny_base(root, seed=0)
    losses = train_qlora(base, root / "adapter")
    flags = ["--data-dir", str(root / "data"), "--base-model-dir", str(base)]
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("LORAPOOL_")]:
            mp.delenv(key)
        assert main([*flags, "migrate"]) == 0
        assert main([*flags, "upload", str(root / "adapter"), "--name", "counter"]) == 0
        assert main([*flags, "merge", "counter", "--out", str(root / "qlora")]) == 0
        assert main([*flags, "merge", "counter:1", "--no-qlora", "--out", str(root / "plain")]) == 0
        shown = _show(flags)
        yield Merged(base, root / "adapter", flags, root / "qlora", root / "plain", losses, shown)


def _show(flags: list[str]) -> dict[str, Any]:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([*flags, "show", "counter", "--json"]) == 0
    return dict(json.loads(out.getvalue()))


def test_qlora_merge_is_closer_than_the_plain_merge(merged: Merged) -> None:
    first, last = merged.losses
    assert last < 0.5 * first  # the adapter learned something on its NF4 base
    reference = PeftModel.from_pretrained(nf4_model(merged.base), str(merged.adapter)).eval()
    heldout = tokens(1000, 3, 12)  # never trained on
    kl = {
        name: mean_kl(reference, AutoModelForCausalLM.from_pretrained(str(path)).eval(), heldout)
        for name, path in (("qlora", merged.qlora), ("plain", merged.plain))
    }
    assert kl["qlora"] < 1e-4  # fp32 compute: the QLoRA merge is the unmerged model
    assert kl["qlora"] < kl["plain"] / 100, kl


def test_the_registry_records_the_training_quantization(merged: Merged) -> None:
    assert merged.shown["base_quantization"] == "nf4"
    info = json.loads((merged.qlora / "lorapool_merge.json").read_text())
    assert info == {
        "adapter": "counter:1",
        "digest": merged.shown["digest"],
        "mode": "qlora",  # the default: the adapter records a 4-bit base
        "quantization": "nf4",
        "compute_dtype": "float32",  # the recorded one
        "double_quant": False,
    }
    assert json.loads((merged.plain / "lorapool_merge.json").read_text())["mode"] == "plain"


def test_the_merged_directory_serves_in_our_worker(merged: Merged) -> None:
    engine = Engine.from_config(EngineConfig(model=str(merged.qlora), page_size=4))
    seen = record_logits(engine)
    hf = AutoModelForCausalLM.from_pretrained(str(merged.qlora)).eval()
    prompt = tokens(2000, 1, 10)[0].tolist()
    result = engine.generate([prompt], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + result.token_ids])).logits[0, len(prompt) - 1 : -1]
    torch.testing.assert_close(torch.stack(seen["generate-0"]), ref, atol=LOGIT_ATOL, rtol=0)
    assert result.token_ids == ref.argmax(-1).tolist() == [TARGET] * 4


def test_merging_an_adapter_for_another_base(
    merged: Merged, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tiny_base(tmp_path, seed=1, hidden=128)
    flags = [*merged.flags[:2], "--base-model-dir", str(other)]
    capsys.readouterr()
    assert main([*flags, "merge", "counter", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "uploaded for another base model" in err
    assert not (tmp_path / "x").exists()


def test_merge_refuses_a_used_out_dir(merged: Merged, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*merged.flags, "merge", "counter", "--out", str(merged.plain)]) == 1
    assert "is not an empty directory" in capsys.readouterr().err


def test_merge_is_local_only(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--target", "127.0.0.1:1", "merge", "x", "--out", "y"])
    assert code == 1 and "local registry only" in capsys.readouterr().err


def test_which_merge() -> None:
    nf4_bf16 = BaseQuantization("nf4", "bfloat16", double_quant=True)
    assert qlora_quantization(None, None, None, None) is None  # nothing recorded: plain
    assert qlora_quantization(nf4_bf16, False, None, None) is None
    q = qlora_quantization(nf4_bf16, None, None, None)
    assert q is not None and (q.name, q.compute_dtype, q.double_quant) == (
        "nf4",
        torch.bfloat16,
        True,
    )
    q = qlora_quantization(None, True, None, None)  # asked, nothing recorded: QLoRA's
    assert q is not None and (q.name, q.compute_dtype) == ("nf4", torch.bfloat16)
    assert qlora_quantization(BaseQuantization("int8"), None, None, None) is None
    with pytest.raises(MergeError, match="gptq base"):
        qlora_quantization(BaseQuantization("gptq"), True, None, None)
    with pytest.raises(MergeError, match="unsupported quantization 'nf5'"):
        qlora_quantization(None, True, "nf5", None)
