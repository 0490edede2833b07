"""Speculative decoding on the CPU: tokens/s with and without it, SmolLM2-135M, greedy.

Workloads (chat prompts, EOS respected, at most --tokens new tokens):
  grounded   rewrite, extract or summarize a given text (prompt lookup shines)
  open       open-ended questions and stories (little to look up)
at batch 1 (requests one after another) and batch 16 (16 requests at once). Each case
runs plain and speculative engines in the same process, in two interleaved rounds
(plain first, then speculative first); the best round of each counts, and the speedup is
speculative over plain tokens/s. Outputs are compared token for token (greedy: identical).

Speculation is n-gram prompt lookup with the adaptive control (γ at most 8). A draft cut
from SmolLM2 itself (its first --draft-layers layers and its head) is measured at batch 1
for what it is (--draft-layers 0 skips it). Writes bench/results/speculative.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# `python bench/speculative.py` puts bench/ first on sys.path, where bench/kernels.py would
# shadow the `kernels` package transformers probes for: look in the repository root instead.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from worker.config import EngineConfig, default_cache_dir  # noqa: E402
from worker.engine import Engine  # noqa: E402
from worker.model.source import DEFAULT_MODEL, resolve_model_dir  # noqa: E402
from worker.sequence import SamplingParams  # noqa: E402

TEXTS = [
    "The museum opens at nine in the morning and closes at six in the evening. Tickets "
    "cost twelve euros for adults and six euros for children under fourteen. On the first "
    "Sunday of every month, entry is free for everyone. Guided tours in English start at "
    "eleven and at three, and they last about ninety minutes.",
    "Maria Lopez joined the company in 2019 as a junior engineer. In 2021 she moved to the "
    "data team, where she built the reporting pipeline with Tom Becker and Aiko Tanaka. "
    "Since 2023 she has led the platform group, which now has eleven engineers in Madrid "
    "and four in Berlin.",
    "To reset the router, unplug it from the power socket and wait thirty seconds. Plug it "
    "back in and wait until the green light stops blinking. Then open the admin page at "
    "192.168.1.1, log in with the password printed on the back of the router, and choose "
    "Restore Defaults from the System menu.",
    "The river rises in the northern hills and flows south for two hundred kilometres. It "
    "passes three large towns, where old stone bridges cross it, before it reaches the sea "
    "at a wide estuary. Salmon swim up the river every autumn, and herons hunt along its "
    "banks all year round.",
]
TASKS = [
    "Rewrite the following text, keeping every sentence but fixing nothing:\n\n{text}",
    "Extract every sentence of this text that contains a number, one per line:\n\n{text}",
    "Repeat the following text word for word:\n\n{text}",
    "Summarize the following text in three sentences, reusing its wording:\n\n{text}",
]
OPEN = [
    "Write a short story about a dragon who learns to bake bread.",
    "Tell me about the history of jazz music.",
    "What are some good habits for staying healthy?",
    "Describe a walk through a forest in autumn.",
    "Explain how a rainbow forms.",
    "Write a poem about the sea.",
    "What should I pack for a week of hiking?",
    "Give me some ideas for a birthday party.",
]


def grounded(n: int) -> list[list[dict[str, str]]]:
    return [
        [{"role": "user", "content": TASKS[i % 4].format(text=TEXTS[(i // 4 + i) % 4])}]
        for i in range(n)
    ]


def open_ended(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": OPEN[i % len(OPEN)]}] for i in range(n)]


@dataclass
class Run:
    seconds: float
    tokens: int
    outputs: list[list[int]]
    proposed: int
    accepted: int
    steps: int  # sampling sequence-steps
    emitted: int  # tokens they yielded

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds


def run(engine: Engine, prompts: list[Any], batch: int, tokens: int) -> Run:
    """Generate every prompt, `batch` at a time; wall time and the speculation counters."""
    sampling = SamplingParams(max_tokens=tokens)
    before = engine.speculator.summary()
    outputs: list[list[int]] = []
    started = time.perf_counter()
    for i in range(0, len(prompts), batch):
        outputs += [e.token_ids for e in engine.generate(prompts[i : i + batch], sampling)]
    seconds = time.perf_counter() - started
    after = engine.speculator.summary()
    return Run(
        seconds,
        sum(len(o) for o in outputs),
        outputs,
        after.proposed - before.proposed,
        after.accepted - before.accepted,
        after.steps - before.steps,
        after.tokens - before.tokens,
    )


def case(
    plain: Engine, spec: Engine, prompts: list[Any], batch: int, tokens: int, rounds: int
) -> dict[str, Any]:
    """Interleaved rounds of plain and speculative; the best of each, and their ratio."""
    runs: dict[str, list[Run]] = {"plain": [], "spec": []}
    for r in range(rounds):
        order = ("plain", "spec") if r % 2 == 0 else ("spec", "plain")
        for name in order:
            runs[name].append(run(plain if name == "plain" else spec, prompts, batch, tokens))
    best = {name: max(rs, key=lambda x: x.tok_s) for name, rs in runs.items()}
    s = best["spec"]
    return {
        "tok_s_plain": round(best["plain"].tok_s, 2),
        "tok_s_spec": round(s.tok_s, 2),
        "speedup": round(s.tok_s / best["plain"].tok_s, 3),
        "acceptance_rate": round(s.accepted / s.proposed, 3) if s.proposed else 0.0,
        "tokens_per_step": round(s.emitted / s.steps, 3) if s.steps else 0.0,
        "proposed": s.proposed,
        "accepted": s.accepted,
        "generated_tokens": s.tokens,
        "identical_output": all(
            r.outputs == runs["plain"][0].outputs for rs in runs.values() for r in rs
        ),
        "runs_tok_s": {name: [round(x.tok_s, 2) for x in rs] for name, rs in runs.items()},
    }


def env() -> dict[str, Any]:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": commit,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=96, help="new tokens per request, at most")
    p.add_argument("--b1-prompts", type=int, default=4, help="requests per batch-1 case")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--gamma", type=int, default=8, help="draft tokens per step, at most")
    p.add_argument("--draft-layers", type=int, default=4, help="0: skip the draft-model case")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="a quick run that writes nothing")
    p.add_argument("--out", type=Path, default=Path("bench/results/speculative.json"))
    a = p.parse_args()
    if a.smoke:
        a.tokens, a.b1_prompts, a.rounds = 12, 1, 1
    torch.set_num_threads(a.threads)
    model_dir = str(resolve_model_dir(DEFAULT_MODEL, default_cache_dir()))
    base = dict(model=model_dir, memory_mb=512, num_speculative_tokens=a.gamma)
    plain = Engine.from_config(EngineConfig(**base))  # type: ignore[arg-type]
    ngram = Engine.from_config(EngineConfig(speculative="ngram", **base))  # type: ignore[arg-type]
    for engine in (plain, ngram):
        run(engine, grounded(2), 2, 8)  # warm-up
    load = [round(x, 2) for x in os.getloadavg()]
    b16 = 2 if a.smoke else 16
    cases = {
        "grounded_b1": (grounded(a.b1_prompts), 1),
        "open_b1": (open_ended(a.b1_prompts), 1),
        "grounded_b16": (grounded(b16), b16),
        "open_b16": (open_ended(b16), b16),
    }
    results = {}
    for name, (prompts, batch) in cases.items():
        results[name] = case(plain, ngram, prompts, batch, a.tokens, a.rounds)
        print(name, json.dumps(results[name]), flush=True)
    del ngram
    if a.draft_layers:
        draft = Engine.from_config(
            EngineConfig(
                speculative="draft", draft_model=model_dir, draft_layers=a.draft_layers, **base
            )  # type: ignore[arg-type]
        )
        run(draft, grounded(1), 1, 8)
        for name in ("grounded_b1", "open_b1"):
            prompts, batch = cases[name]
            results[f"draft{a.draft_layers}_{name}"] = case(
                plain, draft, prompts, batch, a.tokens, a.rounds
            )
            print(f"draft_{name}", json.dumps(results[f"draft{a.draft_layers}_{name}"]), flush=True)
    speedups = {f"speedup_{name}": results[name]["speedup"] for name in cases}
    out = {
        **speedups,
        "targets": {
            "speedup_grounded_b1 >= 1.8": speedups["speedup_grounded_b1"] >= 1.8,
            "speedup_open_b1 >= 0.95": speedups["speedup_open_b1"] >= 0.95,
            "speedup_grounded_b16 >= 0.95": speedups["speedup_grounded_b16"] >= 0.95,
            "speedup_open_b16 >= 0.95": speedups["speedup_open_b16"] >= 0.95,
        },
        "workload": {
            "model": DEFAULT_MODEL,
            "device": "cpu",
            "dtype": "float32",
            "max_new_tokens": a.tokens,
            "batch_1_requests": a.b1_prompts,
            "batch_16_requests": b16,
            "rounds": a.rounds,
            "speculation": f"ngram lookup (n 3..1), adaptive, gamma <= {a.gamma}",
            "draft_case": f"SmolLM2's first {a.draft_layers} layers + head (shared weights)",
        },
        "cases": results,
        "env": {
            **env(),
            "load_average_before": load,
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
    }
    if a.smoke:
        print(json.dumps(out, indent=2))
        return
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
