"""`lorapool run [--adapter DIR|NAME] "prompt"`: the engine in-process, streamed to the terminal.

For offline use and debugging; no gateway or Redis involved. `--adapter` takes a PEFT
directory, a registry blob file, or a registry name (`name` / `name:version`) looked up in
the local registry of the shared data dir (`--data-dir`, `LORAPOOL_DATA_DIR`, else the
per-user data dir: the one `lorapool serve` and `lorapool-admin` use).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from adapter_store.blobs import open_blob_store
from adapter_store.db import make_engine, make_session_factory
from adapter_store.errors import AdapterStoreError
from adapter_store.repository import resolve
from adapter_store.settings import StoreSettings
from worker.config import EngineConfig, default_cache_dir
from worker.engine import Engine
from worker.model.source import DEFAULT_MODEL
from worker.sequence import FinishReason, SamplingParams


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the user message (or raw text with --raw)")
    parser.add_argument(
        "--adapter",
        help="a PEFT LoRA directory, a registry blob file, or a registry name[:version]",
    )
    parser.add_argument("--data-dir", type=Path, help="LORAPOOL_DATA_DIR (for registry names)")
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help="packaged name, HF dir, .gguf, hub id"
    )
    parser.add_argument(
        "--quantize", help="the base model's projections as nf4, fp4 or int8 (bitsandbytes)"
    )
    parser.add_argument(
        "--compute-dtype", default="auto", help="the quantized matmuls' dtype (auto: the model's)"
    )
    parser.add_argument("--raw", action="store_true", help="complete raw text, no chat template")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")


def adapter_source(ref: str, data_dir: Path | None, into: Path) -> Path:
    """`ref` when it is a path; else the verified blob of a registry name, copied into `into`."""
    if Path(ref).exists():
        return Path(ref)
    store = StoreSettings.from_env(data_dir=data_dir)
    missing = store.missing_sqlite_file()
    if missing is not None:
        raise ValueError(f"{ref!r} is no adapter directory or file, and {missing} does not exist")
    engine = make_engine(store.database_url)
    try:
        with make_session_factory(engine)() as session:
            digest = resolve(session, ref).digest
        dest = into / f"{digest}.safetensors"
        open_blob_store(store).fetch_to(digest, dest)
    except (AdapterStoreError, SQLAlchemyError) as exc:
        first = str(exc).splitlines()[0]
        raise ValueError(
            f"{ref!r} is no adapter directory or file, nor an adapter of the registry at "
            f"{store.database_url}: {first}"
        ) from exc
    finally:
        engine.dispose()
    return dest


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="lorapool-run-") as tmp:
        return generate(args, Path(tmp))


def generate(args: argparse.Namespace, tmp: Path) -> int:
    try:
        sampling = SamplingParams(
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            max_tokens=args.max_tokens,
            stop=tuple(args.stop),
        )
        source = adapter_source(args.adapter, args.data_dir, tmp) if args.adapter else None
        config = EngineConfig(
            model=args.model,
            cache_dir=default_cache_dir(),
            quantize=None if args.quantize in (None, "none") else args.quantize,
            compute_dtype=args.compute_dtype,
        )
        engine = Engine.from_config(config)
        adapter_id = None
        if source is not None:
            adapter_id = "local"
            engine.register_adapter(adapter_id, source)
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
