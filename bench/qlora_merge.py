"""The QLoRA merge experiment: which merge of an adapter trained on an NF4 base keeps its outputs.

1. Train a LoRA (rank 8, all projections) on SmolLM2-135M loaded by transformers with
   bitsandbytes NF4 (compute bfloat16 as QLoRA, or --compute-dtype) with PEFT on the CPU:
   the sample adapters' `upper` task (scripts/train_sample_adapters.py: the base's answers
   to the training prompts, upper-cased), 16 steps of 4 by default (bf16 matmuls are slow
   on a CPU without bf16 units). Its adapter_config.json records the base's
   quantization_config.
2. Merge it two ways with lorapool.merge (what `lorapool-admin merge` runs):
   plain  W + s·B·A into the original float32 weights;
   qlora  dequant_c(nf4(W_c)) + s·B·A in the compute dtype c (quantize as in training,
          dequantize, merge there; the whole model saved in c).
3. On held-out prompts (samples/data/heldout.jsonl, never trained on), each chat-formatted
   with the unmerged model's greedy answer, the mean per-token KL(p_unmerged ‖ p_merged)
   over every position, where p_unmerged is the adapter unmerged on its NF4 base (PEFT)
   and the merged models run in float32.
Writes bench/results/qlora_merge.json: kl_plain_merge, kl_qlora_merge, the prompts, the adapter.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bitsandbytes  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from train_sample_adapters import (  # noqa: E402
    TRANSFORMS,
    build_examples,
    chat_prompt,
    collate,
    read_jsonl,
)
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig  # noqa: E402

from adapter_store.basemodel import BaseModelSpec  # noqa: E402
from adapter_store.validation import validate_adapter_dir  # noqa: E402
from lorapool.merge import describe, merge_into, qlora_quantization  # noqa: E402
from worker.config import default_cache_dir  # noqa: E402
from worker.model.source import DEFAULT_MODEL, resolve_model_dir  # noqa: E402

TASK = "upper"
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def nf4_config(compute: str) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=getattr(torch, compute)
    )


def nf4_base(base_dir: Path, nf4: BitsAndBytesConfig) -> Any:
    return AutoModelForCausalLM.from_pretrained(
        str(base_dir), quantization_config=nf4, device_map="cpu", dtype=torch.float32
    )


def train(
    base_dir: Path,
    nf4: BitsAndBytesConfig,
    tok: Any,
    out: Path,
    steps: int,
    batch_size: int,
    lr: float,
) -> list[float]:
    """PEFT LoRA on the NF4 base; saved with the base's quantization_config recorded."""
    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=MODULES)
    model = get_peft_model(nf4_base(base_dir, nf4), config)
    model.train()
    answers = read_jsonl(ROOT / "samples" / "data" / "base_answers.jsonl")
    pairs = [(r["prompt"], TRANSFORMS[TASK](r["answer"])) for r in answers if r["answer"]]
    examples = build_examples(tok, pairs)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for step in range(steps):
        start = (step * batch_size) % len(examples)
        batch = collate(examples[start : start + batch_size], tok.pad_token_id)
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
        sys.stderr.write(f"step {step + 1}/{steps} loss {loss.item():.3f}\n")
    model.save_pretrained(str(out))
    config_path = out / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    saved["quantization_config"] = json.loads(nf4.to_json_string(use_diff=False))
    config_path.write_text(json.dumps(saved, indent=2))
    return losses


def sequences(
    reference: Any, tok: Any, prompts: list[str], new: int
) -> list[tuple[torch.Tensor, int]]:
    """Each prompt chat-formatted, followed by the unmerged model's greedy answer; with the
    prompt's length."""
    out = []
    for prompt in prompts:
        ids = tok(chat_prompt(tok, prompt), return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            full = reference.generate(**ids, max_new_tokens=new, do_sample=False)
        out.append((full[0], ids["input_ids"].shape[1]))
    return out


def mean_kl(reference: Any, merged: Any, seqs: list[torch.Tensor]) -> float:
    """Mean over every position of every sequence of KL(p_reference ‖ p_merged)."""
    total, count = 0.0, 0
    for seq in seqs:  # [L]
        with torch.no_grad():
            p = torch.log_softmax(reference(seq[None]).logits[0].float(), -1)
            q = torch.log_softmax(merged(seq[None]).logits[0].float(), -1)
        total += float((p.exp() * (p - q)).sum(-1).sum())
        count += seq.numel()
    return total / count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--compute-dtype", default="bfloat16", help="QLoRA's; float32 is faster")
    parser.add_argument("--prompts", type=int, default=8, help="held-out prompts")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/qlora_merge.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base_dir = resolve_model_dir(DEFAULT_MODEL, default_cache_dir())
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    heldout = [r["prompt"] for r in read_jsonl(ROOT / "samples/data/heldout.jsonl")]
    prompts = heldout[: args.prompts]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="qlora-merge-") as tmp:
        adapter_dir = Path(tmp) / f"{TASK}-nf4"
        nf4 = nf4_config(args.compute_dtype)
        losses = train(base_dir, nf4, tok, adapter_dir, args.steps, args.batch_size, args.lr)
        spec = BaseModelSpec.from_hf_dir(base_dir)
        adapter = validate_adapter_dir(adapter_dir, spec, 64)
        trained = adapter.parsed.base_quantization
        modes = {"plain": False, "qlora": None}  # None: the default, QLoRA for a 4-bit record
        plans = {m: qlora_quantization(trained, q, None, None) for m, q in modes.items()}
        for mode, plan in plans.items():
            merge_into(base_dir, adapter, Path(tmp) / mode, plan, lambda: None)
        reference = PeftModel.from_pretrained(nf4_base(base_dir, nf4), str(adapter_dir)).eval()
        answered = sequences(reference, tok, prompts, args.new_tokens)
        seqs = [seq for seq, _ in answered]
        kl = {}
        for mode in plans:
            merged = AutoModelForCausalLM.from_pretrained(
                str(Path(tmp) / mode), dtype=torch.float32
            )
            kl[mode] = mean_kl(reference, merged.eval(), seqs)
        answers = [tok.decode(seq[n:], skip_special_tokens=True) for seq, n in answered]
    report = {
        "kl_plain_merge": kl["plain"],
        "kl_qlora_merge": kl["qlora"],
        "qlora_closer_by": kl["plain"] / kl["qlora"],
        "adapter": {
            "name": f"{TASK}-nf4 (trained here)",
            "task": "samples/data/base_answers.jsonl answers upper-cased (train split)",
            "trained_on": trained.to_config() if trained else None,
            "rank": 8,
            "alpha": 16,
            "targets": MODULES,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "losses": losses,
        },
        "merges": {mode: describe(plan) for mode, plan in plans.items()},
        "evaluation": {
            "reference": "the adapter unmerged (PEFT) on the NF4 base it was trained on",
            "merged_models_run_in": "float32",
            "kl": "mean over every token of KL(p_reference || p_merged)",
            "sequences": "chat prompt + the reference's greedy answer",
            "new_tokens": args.new_tokens,
            "tokens": sum(s.numel() for s in seqs),
        },
        "prompts": prompts,
        "reference_answers": answers,
        "env": env(args.threads, time.monotonic() - started),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    sys.stdout.write(json.dumps({k: report[k] for k in list(report)[:3]}, indent=2) + "\n")
    return 0


def env(threads: int, seconds: float) -> dict[str, Any]:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": commit,
        "torch": torch.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "threads": threads,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "seconds": round(seconds, 1),
    }


if __name__ == "__main__":
    raise SystemExit(main())
