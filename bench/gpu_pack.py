"""Pack the packaged SmolLM2 for a GPU host without internet: bf16 safetensors shards.

    python -m bench.gpu_pack [--out .gpu/smollm2-bf16] [--shard-mb 60]

The device tool carries at most 64 MiB per call and keeps what earlier calls left; the
shards (~270 MB in all) go over in a few calls, then `make gpu-check
GPU_CHECK_ARGS="--model .gpu/smollm2-bf16"` loads them (the loader reads every
*.safetensors file of a directory).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(".gpu/smollm2-bf16"))
    p.add_argument("--shard-mb", type=int, default=60)
    args = p.parse_args(argv)
    from worker.config import default_cache_dir
    from worker.model.source import DEFAULT_MODEL, resolve_model_dir

    source = resolve_model_dir(DEFAULT_MODEL, default_cache_dir())
    args.out.mkdir(parents=True, exist_ok=True)
    shard: dict[str, torch.Tensor] = {}
    size, index, n = 0, {}, 0
    for path in sorted(source.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118
                tensor = f.get_tensor(name).to(torch.bfloat16).contiguous()
                if size and size + tensor.nbytes > args.shard_mb * 2**20:
                    n = _flush(shard, args.out, n, index)
                    shard, size = {}, 0
                shard[name], size = tensor, size + tensor.nbytes
    _flush(shard, args.out, n, index)
    (args.out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    for extra in source.iterdir():
        if extra.suffix != ".safetensors":
            shutil.copy(extra, args.out / extra.name)
    sys.stdout.write(f"wrote {args.out} ({len(set(index.values()))} shards)\n")
    return 0


def _flush(shard: dict[str, torch.Tensor], out: Path, n: int, index: dict[str, str]) -> int:
    name = f"model-{n:05d}.safetensors"
    save_file(shard, str(out / name), metadata={"format": "pt"})
    index.update(dict.fromkeys(shard, name))
    return n + 1


if __name__ == "__main__":
    raise SystemExit(main())
