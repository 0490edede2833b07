"""The worker's settings: one validated object, built at the entry point, passed down."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from platformdirs import user_cache_dir

from worker.model.source import DEFAULT_MODEL


def default_cache_dir() -> Path:
    """`LORAPOOL_CACHE_DIR`, else the per-user cache directory (read at entry points only)."""
    return Path(os.environ.get("LORAPOOL_CACHE_DIR") or user_cache_dir("lorapool"))


@dataclass(frozen=True)
class EngineConfig:
    """What the engine needs; every field validated in __post_init__."""

    model: str = DEFAULT_MODEL  # packaged name, local HF dir, .gguf file, or hub id
    # Entry points pass default_cache_dir() (which honours LORAPOOL_CACHE_DIR).
    cache_dir: Path = field(default_factory=lambda: Path(user_cache_dir("lorapool")))
    device: str = "cpu"
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    page_size: int = 16  # tokens per KV page
    kv_cache_mb: int = 768  # page pool budget when num_pages is not given
    num_pages: int | None = None  # pages in the pool (KV blocks; adapters later)
    max_num_seqs: int = 64  # sequences running at once
    max_batch_tokens: int = 2048  # token budget per step (prefill chunks + decodes)
    max_model_len: int = 4096  # prompt + completion tokens per sequence
    max_adapters: int = 64  # adapters resident at once (LRU beyond)
    max_lora_rank: int = 128

    def __post_init__(self) -> None:
        positive = {
            "page_size": self.page_size,
            "kv_cache_mb": self.kv_cache_mb,
            "num_pages": 1 if self.num_pages is None else self.num_pages,
            "max_num_seqs": self.max_num_seqs,
            "max_batch_tokens": self.max_batch_tokens,
            "max_model_len": self.max_model_len,
            "max_adapters": self.max_adapters,
            "max_lora_rank": self.max_lora_rank,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(
                f"dtype must be auto, float32, bfloat16 or float16, not {self.dtype!r}"
            )
