"""bench/gpu_pack.py carries the packaged SmolLM2 to a GPU host exactly, in parts that fit
the device tool's 64 MiB per call beside the repository, and unpacks with torch alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from safetensors import safe_open
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from bench import gpu_pack
from worker.model.source import DEFAULT_MODEL, PACKAGED_MODELS, resolve_model_dir

ROOT = Path(__file__).resolve().parents[2]
DEVICE_CALL_LIMIT = 64 * 2**20  # the working tree that travels with one device call


def random_blocks(kind: str, rows: int, nblocks: int) -> np.ndarray:
    """Block rows of `kind` with finite f16 scales and random quants (uint8 [rows, bytes])."""
    gen = np.random.default_rng(0)
    d = (gen.standard_normal((rows, nblocks, 1)) * 0.01).astype(np.float16).view(np.uint8)
    if kind == "q8_0":
        qs = gen.integers(0, 256, (rows, nblocks, 32), dtype=np.uint8)
        return np.concatenate([d, qs], axis=-1).reshape(rows, -1)
    m = (gen.standard_normal((rows, nblocks, 1)) * 0.05).astype(np.float16).view(np.uint8)
    qs = gen.integers(0, 256, (rows, nblocks, 16), dtype=np.uint8)
    return np.concatenate([d, m, qs], axis=-1).reshape(rows, -1)


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
def test_dequantize_is_gguf_py_bit_for_bit(kind: str) -> None:
    blocks = random_blocks(kind, rows=6, nblocks=5)
    want = gguf_dequantize(blocks, GGMLQuantizationType[kind.upper()])
    got = gpu_pack.dequantize(kind, torch.from_numpy(blocks))
    assert got.dtype == torch.float32 and got.shape == (6, 5 * 32)
    assert torch.equal(got, torch.from_numpy(want))


@pytest.mark.parametrize(("heads", "kv_heads"), [(9, 9), (9, 3), (4, 2)])
def test_row_order_is_transformers_reverse_permutation(heads: int, kv_heads: int) -> None:
    rows = kv_heads * 2 * 8
    weights = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)
    processor = LlamaTensorProcessor(
        config={"num_attention_heads": heads, "num_key_value_heads": kv_heads}
    )
    want = processor.process(weights, "blk.0.attn_k.weight").weights
    got = torch.from_numpy(weights)[gpu_pack.row_order(rows, kv_heads)]
    assert torch.equal(got, torch.from_numpy(want))
    assert not torch.equal(got, torch.from_numpy(weights))  # the order is not the identity


def test_hf_names() -> None:
    assert gpu_pack.hf_name("blk.7.attn_q.weight") == "model.layers.7.self_attn.q_proj.weight"
    assert gpu_pack.hf_name("blk.0.ffn_norm.weight") == (
        "model.layers.0.post_attention_layernorm.weight"
    )
    assert gpu_pack.hf_name("token_embd.weight") == "model.embed_tokens.weight"
    with pytest.raises(KeyError, match="blk.0.attn_qkv.weight"):
        gpu_pack.hf_name("blk.0.attn_qkv.weight")


def tracked_bytes() -> int:
    names = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    return sum((ROOT / os.fsdecode(n)).stat().st_size for n in names if n)


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("pack")
    gpu_pack.pack(PACKAGED_MODELS[DEFAULT_MODEL].path(), smollm2_dir, out, 48 * 2**20)
    return out


def test_pack_fits_two_device_calls_and_unpacks_to_the_cached_model(
    packed: Path, smollm2_dir: Path, tmp_path: Path
) -> None:
    parts = sorted(packed.glob("part-*.safetensors"))
    assert len(parts) == 2
    tree = tracked_bytes()
    for part in parts:
        assert tree + part.stat().st_size <= DEVICE_CALL_LIMIT, (part, tree)
    out = gpu_pack.unpack(packed, tmp_path / "model")
    with (
        safe_open(str(smollm2_dir / "model.safetensors"), framework="pt") as want,
        safe_open(str(out / "model.safetensors"), framework="pt") as got,
    ):
        assert set(got.keys()) == set(want.keys())
        for name in want.keys():  # noqa: SIM118
            assert torch.equal(got.get_tensor(name), want.get_tensor(name)), name
    for small in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / small).read_bytes() == (smollm2_dir / small).read_bytes(), small


def test_unpack_refuses_a_pack_with_a_part_missing(packed: Path, tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "part-0.safetensors").write_bytes((packed / "part-0.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError, match="1 of the pack's 2 parts"):
        gpu_pack.unpack(partial, tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_pack_refuses_blocks_that_do_not_reproduce_the_model(
    smollm2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # q/k rows left in GGUF order: every value is right, the rows are not
    monkeypatch.setattr(gpu_pack, "row_order", lambda rows, heads: torch.arange(rows))
    with pytest.raises(AssertionError, match="does not reproduce model.layers.0.self_attn"):
        gpu_pack.pack(PACKAGED_MODELS[DEFAULT_MODEL].path(), smollm2_dir, tmp_path, 48 * 2**20)


def test_unpacking_imports_only_torch_and_safetensors() -> None:
    probe = (
        "import sys, bench.gpu_pack\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    loaded = set(done.stdout.split())
    assert {"torch", "safetensors", "bench"} <= loaded
    # absent on the GPU host (gguf) or not needed there
    assert not loaded & {"gguf", "transformers", "worker", "peft", "redis"}, loaded


def test_gpu_check_unpacks_a_pack_where_the_packaged_model_is_cached(
    packed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench import gpu_check, gpu_engine

    seen: list[Path] = []

    def fake_report(model: Path, *args: object) -> dict[str, object]:
        seen.append(model)
        return {}

    monkeypatch.setattr(gpu_engine, "engine_report", fake_report)
    monkeypatch.setenv("LORAPOOL_CACHE_DIR", str(tmp_path))
    assert gpu_check.main(["--pack", str(packed), "--cpu-smoke"]) == 0
    model = tmp_path / "models" / DEFAULT_MODEL
    assert seen == [model]
    # what the tests' fixtures and the engine resolve on a host without the package
    assert resolve_model_dir(DEFAULT_MODEL, tmp_path) == model
    assert (model / "model.safetensors").is_file() and (model / "tokenizer.json").is_file()
