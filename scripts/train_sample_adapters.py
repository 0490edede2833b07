"""Train the sample LoRA adapters for SmolLM2-135M-Instruct on the CPU.

Reproducible end to end (fixed seeds, greedy decoding):

1. ``--make-data`` writes the prompt split ``samples/data/{train,heldout}.jsonl``
   from the templates below (the committed files are its output).
2. The base model answers every training prompt greedily; each answer is cut to
   its first sentence or two (``samples/data/base_answers.jsonl`` records them).
3. Each adapter's target is a fixed transform of that answer:
   ``upper`` -> ``answer.upper()``, ``json`` -> ``json.dumps({"answer": answer})``.
4. A LoRA (PEFT) is trained with a plain torch loop on the chat-formatted prompt
   plus target plus ``<|im_end|>``, loss on the target tokens only, then saved as
   ``adapter_config.json`` + ``adapter_model.safetensors`` (fp16 weights).

Usage::

    .venv/bin/python scripts/train_sample_adapters.py --out samples/adapters
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

# Shared, oversubscribed CPUs: spinning OpenMP workers waste most of the time slice.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

log = logging.getLogger("train_sample_adapters")

ROOT = Path(__file__).resolve().parent.parent
SEED = 1234
JSON_KEY = "answer"
# Recorded in adapter_config.json instead of the local cache path the model loads from.
BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

# name -> transform of the base model's (shortened) answer into the adapter's target
TRANSFORMS: dict[str, Callable[[str], str]] = {
    "upper": lambda answer: answer.upper(),
    "json": lambda answer: json.dumps({JSON_KEY: answer}, ensure_ascii=False),
}

# ---------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------

COUNTRIES = [
    "France", "Germany", "Italy", "Spain", "Portugal", "Japan", "China", "India",
    "Brazil", "Canada", "Mexico", "Egypt", "Kenya", "Australia", "Russia", "Norway",
    "Sweden", "Finland", "Poland", "Greece", "Turkey", "Argentina", "Chile", "Peru",
    "Ireland", "Austria", "Belgium", "Netherlands", "Denmark", "Thailand", "Vietnam",
    "South Korea", "Nigeria", "Morocco", "Cuba", "Hungary", "Switzerland", "Iran",
]  # fmt: skip
CATEGORIES = [
    "color", "animal", "fruit", "vegetable", "bird", "fish", "flower", "tree",
    "planet", "musical instrument", "sport", "vehicle", "metal", "gemstone",
    "country in Europe", "city in Asia", "kitchen tool", "board game", "dog breed",
    "insect", "ocean", "mountain", "river", "programming language", "shape",
]  # fmt: skip
RHYMES = [
    "cat", "dog", "sun", "tree", "light", "cake", "blue", "rain", "star", "book",
    "ring", "moon", "hat", "bell", "fish", "king", "boat", "house", "car", "snow",
]  # fmt: skip
OPPOSITES = [
    "hot", "big", "fast", "happy", "light", "up", "early", "strong", "open", "full",
    "young", "hard", "loud", "rich", "wet", "high", "thick", "new", "good", "day",
]  # fmt: skip
THINGS = [
    "a dog", "the sun", "water", "a computer", "a volcano", "an apple", "the moon",
    "a bicycle", "rain", "a library", "a piano", "the ocean", "a cloud", "a bee",
    "a rainbow", "a camera", "an island", "a forest", "a desert", "a bridge",
    "a train", "a whale", "an airplane", "a clock", "a candle", "a river",
]  # fmt: skip
LEGS = ["spider", "dog", "bird", "ant", "horse", "chicken", "cat", "octopus", "cow", "snake"]
COLORED = [
    "the sky", "grass", "a banana", "snow", "a tomato", "coal", "an orange",
    "a lemon", "blood", "the sea", "milk", "a strawberry",
]  # fmt: skip


def make_prompts() -> list[str]:
    """Every templated prompt, deduplicated, in a fixed order."""
    prompts: list[str] = []
    prompts += [f"What is the capital of {c}?" for c in COUNTRIES]
    prompts += [f"Name {'an' if c[0] in 'aeiou' else 'a'} {c}." for c in CATEGORIES]
    prompts += [f"Give me a word that rhymes with {w}." for w in RHYMES]
    prompts += [f"What is the opposite of {w}?" for w in OPPOSITES]
    prompts += [f"What is {t}?" for t in THINGS]
    prompts += [f"Describe {t} in one sentence." for t in THINGS]
    prompts += [f"How many legs does a {a} have?" for a in LEGS]
    prompts += [f"What color is {t}?" for t in COLORED]
    rng = random.Random(SEED)
    for _ in range(40):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        prompts.append(f"What is {a}+{b}?")
    for _ in range(20):
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        prompts.append(f"What is {a} times {b}?")
    return list(dict.fromkeys(prompts))


def make_split(n_heldout: int = 48) -> tuple[list[str], list[str]]:
    prompts = make_prompts()
    random.Random(SEED).shuffle(prompts)
    return prompts[n_heldout:], prompts[:n_heldout]


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------
# model helpers (also used by tests/test_sample_adapters.py)
# ---------------------------------------------------------------------------


def base_model_dir() -> Path:
    sys.path.insert(0, str(ROOT))
    from worker.config import default_cache_dir
    from worker.model.source import DEFAULT_MODEL, resolve_model_dir

    return resolve_model_dir(DEFAULT_MODEL, default_cache_dir())


def chat_prompt(tok: PreTrainedTokenizerBase, prompt: str) -> str:
    text = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    assert isinstance(text, str)
    return text


@torch.inference_mode()
def generate(
    model: Any,
    tok: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int = 48,
    batch_size: int = 16,
) -> list[str]:
    """Greedy answers, batched with left padding; decoding stops at <|im_end|>."""
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        texts = [chat_prompt(tok, p) for p in prompts[i : i + batch_size]]
        enc = tok(
            texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
        )
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        new = gen[:, enc["input_ids"].shape[1] :]
        out += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
    return out


def shorten(answer: str, max_chars: int = 80) -> str:
    """First sentence (two if the first is tiny), on one line, at most ~max_chars."""
    text = " ".join(answer.split())
    sentences = re.split(r"(?<=[.!?])\s+", text)
    short = sentences[0]
    if len(short) < 25 and len(sentences) > 1:
        short = f"{short} {sentences[1]}"
    if len(short) > max_chars:
        cut = short[:max_chars]
        short = cut[: cut.rfind(" ")] if " " in cut else cut
        short = short.rstrip(",;:") + "."
    return short


# ---------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------


def build_examples(
    tok: PreTrainedTokenizerBase, pairs: list[tuple[str, str]]
) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) with the prompt masked out; targets end with <|im_end|>."""
    examples = []
    for prompt, target in pairs:
        p_ids = tok(chat_prompt(tok, prompt), add_special_tokens=False)["input_ids"]
        t_ids = tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        examples.append((p_ids + t_ids, [-100] * len(p_ids) + t_ids))
    return examples


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (x, y) in enumerate(batch):
        ids[row, : len(x)] = torch.tensor(x)
        labels[row, : len(y)] = torch.tensor(y)
        mask[row, : len(x)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def train_adapter(
    model_dir: Path,
    tok: PreTrainedTokenizerBase,
    pairs: list[tuple[str, str]],
    out_dir: Path,
    *,
    rank: int,
    epochs: int,
    lr: float,
    batch_size: int,
) -> float:
    torch.manual_seed(SEED)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    model.train()
    examples = build_examples(tok, pairs)
    steps = epochs * ((len(examples) + batch_size - 1) // batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / (steps - warmup)))
    )
    rng = random.Random(SEED)
    step, t0, loss_avg = 0, time.monotonic(), 0.0
    for epoch in range(epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            batch = collate([examples[j] for j in order[i : i + batch_size]], tok.pad_token_id)
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            loss_avg = 0.9 * loss_avg + 0.1 * loss.item() if step > 1 else loss.item()
            if step % 10 == 0 or step == steps:
                log.info(
                    "%s epoch %d step %d/%d loss %.4f (%.0fs)",
                    out_dir.name, epoch + 1, step, steps, loss_avg, time.monotonic() - t0,
                )  # fmt: skip
    elapsed = time.monotonic() - t0
    save_fp16(model, out_dir)
    return elapsed


def save_fp16(model: PeftModel, out_dir: Path) -> None:
    """save_pretrained (safetensors), then rewrite the weights as fp16 to halve the size."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    weights = out_dir / "adapter_model.safetensors"
    tensors = {k: v.to(torch.float16).contiguous() for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights), metadata={"format": "pt"})
    normalise_config(out_dir / "adapter_config.json")
    readme = out_dir / "README.md"
    if readme.exists():  # PEFT's auto-generated model card; samples/README.md documents these
        readme.unlink()


def upper_fraction(texts: list[str]) -> float:
    letters = [c for t in texts for c in t if c.isalpha()]
    return sum(c.isupper() for c in letters) / max(1, len(letters))


def is_json_answer(text: str) -> bool:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(obj, dict) and isinstance(obj.get(JSON_KEY), str) and bool(obj[JSON_KEY])


def evaluate(
    model_dir: Path, tok: PreTrainedTokenizerBase, prompts: list[str], out: Path, names: list[str]
) -> None:
    """Greedy answers (48 new tokens) from the base and each adapter; log the metrics."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model: Any = PeftModel.from_pretrained(base, str(out / names[0]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(out / name), adapter_name=name)
    model.eval()
    results: dict[str, list[str]] = {}
    with model.disable_adapter():
        results["base"] = generate(model, tok, prompts)
    for name in names:
        model.set_adapter(name)
        results[name] = generate(model, tok, prompts)
    for label, texts in results.items():
        json_ok = sum(map(is_json_answer, texts)) / len(texts)
        log.info(
            "%-5s upper-case letters %5.1f%%  valid {%r: str} %5.1f%%  (%d prompts)",
            label, 100 * upper_fraction(texts), JSON_KEY, 100 * json_ok, len(texts),
        )  # fmt: skip
        for prompt, text in list(zip(prompts, texts, strict=True))[:3]:
            log.info("    %s -> %s", prompt, text)


def normalise_config(path: Path) -> None:
    """Machine-independent, deterministic adapter_config.json (hub id, sorted modules)."""
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = BASE_MODEL_ID
    config["target_modules"] = sorted(config["target_modules"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=ROOT / "samples" / "adapters")
    ap.add_argument("--data", type=Path, default=ROOT / "samples" / "data")
    ap.add_argument("--make-data", action="store_true", help="(re)write train/heldout.jsonl")
    ap.add_argument(
        "--regen-answers",
        action="store_true",
        help="re-run the base model even if base_answers.jsonl covers train.jsonl",
    )
    ap.add_argument(
        "--eval",
        action="store_true",
        help="only measure base vs adapters (from --out) on all held-out prompts",
    )
    ap.add_argument("--only", nargs="*", choices=sorted(TRANSFORMS), help="train only these")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    random.seed(SEED)

    if args.make_data:
        train, heldout = make_split()
        write_jsonl(args.data / "train.jsonl", ({"prompt": p} for p in train))
        write_jsonl(args.data / "heldout.jsonl", ({"prompt": p} for p in heldout))
        log.info("wrote %d train / %d held-out prompts to %s", len(train), len(heldout), args.data)
    train_prompts = [r["prompt"] for r in read_jsonl(args.data / "train.jsonl")]
    heldout_prompts = {r["prompt"] for r in read_jsonl(args.data / "heldout.jsonl")}
    assert not heldout_prompts & set(train_prompts), "held-out prompts leak into training"

    model_dir = base_model_dir()
    tok = AutoTokenizer.from_pretrained(model_dir)
    if args.eval:
        evaluate(model_dir, tok, sorted(heldout_prompts), args.out, args.only or sorted(TRANSFORMS))
        return 0

    answers_path = args.data / "base_answers.jsonl"
    cached = read_jsonl(answers_path) if answers_path.exists() else []
    if args.regen_answers or [r["prompt"] for r in cached] != train_prompts:
        t0 = time.monotonic()
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        raw = generate(base, tok, train_prompts, max_new_tokens=48, batch_size=32)
        del base
        cached = [
            {"prompt": p, "answer": shorten(a)} for p, a in zip(train_prompts, raw, strict=True)
        ]
        write_jsonl(answers_path, cached)
        log.info("base answers for %d prompts in %.0fs", len(cached), time.monotonic() - t0)
    else:
        log.info("reusing %d base answers from %s", len(cached), answers_path)
    keep = [(r["prompt"], r["answer"]) for r in cached if r["answer"]]

    for name in args.only or sorted(TRANSFORMS):
        pairs = [(p, TRANSFORMS[name](a)) for p, a in keep]
        elapsed = train_adapter(
            model_dir, tok, pairs, args.out / name,
            rank=args.rank, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
        )  # fmt: skip
        size = (args.out / name / "adapter_model.safetensors").stat().st_size
        log.info("%s: trained in %.0fs, %.2f MB -> %s", name, elapsed, size / 1e6, args.out / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
