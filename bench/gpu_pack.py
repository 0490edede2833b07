"""Carry the packaged SmolLM2 to a GPU host without internet: its GGUF blocks, exactly.

    python -m bench.gpu_pack [--out .gpu/pack] [--part-mb 48]      (here: pack and verify)
    python -m bench.gpu_pack --unpack .gpu/pack --out DIR           (there: torch only)

The device tool sends at most 64 MiB per call, the repository's tracked files (~11 MB)
included, and keeps a warm machine's earlier files only until it goes idle. The cached
model is 538 MB of float32 (270 MB in bfloat16: six calls). But every one of its weights
is a dequantized GGUF block (Q4_1 for the projections, Q8_0 for the embedding), so the
blocks themselves, ~97 MB, carry it exactly: two parts of at most `--part-mb` MiB, one
safetensors file each, in two back-to-back calls.

A part holds, per HF weight name, the GGUF block bytes as uint8 rows [out, blocks × block
bytes] (rows already in HF order: transformers' reverse permutation of q_proj/k_proj
rows), float32 tensors as they are, and the model directory's small files (config,
tokenizer) as gzip-compressed uint8 tensors named `file:<name>`. Unpacking dequantizes
on the CPU with the same float32 arithmetic as gguf-py (d · q + m, d · q) and writes an
HF directory the loader reads. `pack` unpacks its own output in memory and compares it
with the cached model, every tensor bit for bit, before it reports success.

Unpacking needs only torch and safetensors (gpu_check calls it with `--pack`).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "lorapool-gguf-blocks-1"
QUANT = ("q4_1", "q8_0")  # the GGUF block types SmolLM2's file uses, dequantized below
GGUF_TO_HF = {  # GGUF tensor name (after `blk.N.`) → HF name (after `model.layers.N.`)
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


# ----------------------------------------------------------------------------- unpack side


def dequantize(kind: str, blocks: torch.Tensor) -> torch.Tensor:
    """GGUF block rows (uint8 [rows, nblocks × block bytes]) → float32 [rows, nblocks × 32].

    q4_1, 20 bytes a block: d (f16), m (f16), 16 bytes of nibbles; element j < 16 is the low
      nibble of byte j, element 16 + j its high nibble; value = d · q + m.
    q8_0, 34 bytes a block: d (f16), 32 int8; value = d · q.
    """
    rows = blocks.shape[0]
    size = {"q4_1": 20, "q8_0": 34}[kind]
    b = blocks.reshape(rows, -1, size)
    d = b[..., 0:2].contiguous().view(torch.float16).float()  # [rows, nblocks, 1]
    if kind == "q8_0":
        q = b[..., 2:].contiguous().view(torch.int8).float()  # [rows, nblocks, 32]
        return (q * d).reshape(rows, -1)
    m = b[..., 2:4].contiguous().view(torch.float16).float()
    qs = b[..., 4:]  # [rows, nblocks, 16]
    q = torch.cat((qs & 0x0F, qs >> 4), dim=-1).float()  # [rows, nblocks, 32]
    return (d * q + m).reshape(rows, -1)


def read_pack(pack: Path) -> tuple[dict[str, torch.Tensor], dict[str, bytes]]:
    """The pack's parts → (HF tensors in float32, the model directory's small files)."""
    parts = sorted(pack.glob("part-*.safetensors"))
    if not parts:
        raise FileNotFoundError(f"{pack} holds no part-*.safetensors")
    tensors: dict[str, torch.Tensor] = {}
    files: dict[str, bytes] = {}
    expected = None
    for path in parts:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not a {FORMAT} part (format {meta.get('format')!r})")
            expected = int(meta["parts"])
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                value = f.get_tensor(key)
                if key.startswith("file:"):
                    files[key[5:]] = gzip.decompress(value.numpy().tobytes())
                    continue
                name, _, kind = key.rpartition(":")
                if kind not in (*QUANT, "f32"):
                    raise ValueError(f"{path}: unknown block type in {key!r}")
                tensors[name] = value if kind == "f32" else dequantize(kind, value)
    if expected != len(parts):
        raise FileNotFoundError(f"{pack} holds {len(parts)} of the pack's {expected} parts")
    return tensors, files


def unpack(pack: Path, out: Path) -> Path:
    """Write the HF directory `out` (float32 safetensors, config, tokenizer) from `pack`."""
    if (out / ".complete").is_file():
        return out
    tensors, files = read_pack(pack)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name, data in files.items():
        (out / name).write_bytes(data)
    (out / ".complete").write_text("ok\n")
    return out


# ------------------------------------------------------------------------------- pack side


def hf_name(gguf_name: str) -> str:
    """`blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight`."""
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in TOP_LEVEL:
        return f"{TOP_LEVEL[stem]}.{suffix}"
    blk, index, op = stem.split(".")
    if blk != "blk" or op not in GGUF_TO_HF:
        raise KeyError(f"no HF name for GGUF tensor {gguf_name!r}")
    return f"model.layers.{index}.{GGUF_TO_HF[op]}.{suffix}"


def row_order(rows: int, heads: int) -> torch.Tensor:
    """transformers' reverse permutation of GGUF q/k rows, as a row index: HF row i is
    GGUF row order[i] (a [heads, dim, 2] → [heads, 2, dim] swap of the output rows)."""
    dim = rows // heads // 2
    return torch.arange(rows).reshape(heads, dim, 2).transpose(1, 2).reshape(rows)


def gguf_entries(path: Path, config: dict[str, int]) -> Iterator[tuple[str, torch.Tensor]]:
    """(`<HF name>:<kind>`, uint8 block rows or float32 tensor) for each GGUF tensor."""
    from gguf import GGUFReader  # here only: the GPU host has no gguf package

    for t in GGUFReader(str(path)).tensors:
        kind = t.tensor_type.name.lower()
        name = hf_name(t.name)
        data = torch.from_numpy(t.data.copy())
        if kind == "f32":
            yield f"{name}:f32", data.float()
            continue
        if kind not in QUANT:
            raise ValueError(f"{t.name}: GGUF type {kind} is not one this pack dequantizes")
        heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
        op = t.name.split(".")[-2]
        if op in heads:
            data = data[row_order(data.shape[0], heads[op])]
        yield f"{name}:{kind}", data.contiguous()


def pack(gguf_path: Path, model_dir: Path, out: Path, part_bytes: int) -> list[Path]:
    """Write `out/part-*.safetensors`, each at most `part_bytes`; verify against model_dir."""
    config = json.loads((model_dir / "config.json").read_text())
    entries: list[tuple[str, torch.Tensor]] = list(gguf_entries(gguf_path, config))
    for small in sorted(model_dir.iterdir()):
        if small.is_file() and small.suffix != ".safetensors" and not small.name.startswith("."):
            blob = gzip.compress(small.read_bytes(), mtime=0)
            entries.append(
                (f"file:{small.name}", torch.frombuffer(bytearray(blob), dtype=torch.uint8))
            )
    parts: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, value in entries:
        nbytes = value.numel() * value.element_size()
        if nbytes > part_bytes:
            raise ValueError(f"{key} alone ({nbytes} bytes) is larger than a part")
        if size + nbytes > part_bytes:
            parts.append({})
            size = 0
        parts[-1][key] = value
        size += nbytes
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("part-*.safetensors"):
        old.unlink()
    paths = []
    for i, part in enumerate(parts):
        path = out / f"part-{i}.safetensors"
        save_file(part, str(path), metadata={"format": FORMAT, "parts": str(len(parts))})
        paths.append(path)
    verify(out, model_dir)
    return paths


def verify(pack_dir: Path, model_dir: Path) -> None:
    """Every tensor of model_dir's safetensors equals the unpacked one, bit for bit."""
    tensors, files = read_pack(pack_dir)
    seen = set()
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118
                want = f.get_tensor(name)
                got = tensors.get(name)
                if got is None or got.shape != want.shape or not torch.equal(got, want.float()):
                    raise AssertionError(f"the pack does not reproduce {name} exactly")
                seen.add(name)
    if extra := set(tensors) - seen:
        raise AssertionError(f"the pack holds tensors the model does not: {sorted(extra)[:3]}")
    if "config.json" not in files:
        raise AssertionError("the pack holds no config.json")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--unpack", type=Path, help="a pack directory to unpack (on the GPU host)")
    p.add_argument("--out", type=Path, help="pack directory, or with --unpack the model dir")
    p.add_argument("--part-mb", type=int, default=48, help="MiB per part (default 48)")
    args = p.parse_args(argv)
    if args.unpack:
        if args.out is None:
            p.error("--unpack needs --out (gpu_check --pack unpacks into the model cache)")
        out = unpack(args.unpack, args.out)
        sys.stdout.write(f"unpacked {args.unpack} into {out}\n")
        return 0
    from worker.config import default_cache_dir
    from worker.model.source import DEFAULT_MODEL, PACKAGED_MODELS, resolve_model_dir

    model_dir = resolve_model_dir(DEFAULT_MODEL, default_cache_dir())
    paths = pack(
        PACKAGED_MODELS[DEFAULT_MODEL].path(),
        model_dir,
        args.out or Path(".gpu/pack"),
        args.part_mb * 2**20,
    )
    for path in paths:
        sys.stdout.write(f"{path} {path.stat().st_size / 2**20:.1f} MiB\n")
    sys.stdout.write(f"verified: unpacking reproduces every tensor of {model_dir} exactly\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
