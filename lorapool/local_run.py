"""`lorapool run [--adapter DIR] "prompt"`: the engine in-process, text streamed to the terminal.

For offline use and debugging; no gateway, Redis or registry involved.
"""

from __future__ import annotations

import argparse
import sys

from worker.config import EngineConfig, default_cache_dir
from worker.engine import Engine
from worker.model.source import DEFAULT_MODEL
from worker.sequence import FinishReason, SamplingParams


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the user message (or raw text with --raw)")
    parser.add_argument("--adapter", help="a PEFT LoRA directory or a registry blob file")
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help="packaged name, HF dir, .gguf, hub id"
    )
    parser.add_argument("--raw", action="store_true", help="complete raw text, no chat template")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")


def run(args: argparse.Namespace) -> int:
    try:
        sampling = SamplingParams(
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            max_tokens=args.max_tokens,
            stop=tuple(args.stop),
        )
        config = EngineConfig(model=args.model, cache_dir=default_cache_dir())
        engine = Engine.from_config(config)
        adapter_id = None
        if args.adapter:
            adapter_id = "local"
            engine.register_adapter(adapter_id, args.adapter)
        prompt = args.prompt if args.raw else [{"role": "user", "content": args.prompt}]
        engine.add_request("run", prompt, sampling, adapter_id)
    except (ValueError, FileNotFoundError) as exc:
        sys.stderr.write(f"lorapool run: error: {exc}\n")
        return 2
    while engine.has_unfinished():
        for event in engine.step():
            sys.stdout.write(event.text)
            sys.stdout.flush()
            if event.finish_reason is FinishReason.ERROR:
                sys.stderr.write(f"\nlorapool run: error: {event.error}\n")
                return 1
    sys.stdout.write("\n")
    return 0
