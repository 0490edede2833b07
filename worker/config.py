"""The worker's settings: one validated object, built at the entry point, passed down."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from adapter_store import settings as store_settings
from worker.model.quant import COMPUTE_DTYPES, quant_kind
from worker.model.source import DEFAULT_MODEL
from worker.sequence import MAX_SPECULATIVE_TOKENS, SpecMethod


def default_cache_dir() -> Path:
    """`LORAPOOL_CACHE_DIR`, else the per-user cache directory (read at entry points only).

    Resolved by adapter_store.settings, the one place every entry point's directories come from.
    """
    return store_settings.default_cache_dir()


@dataclass(frozen=True)
class EngineConfig:
    """What the engine needs; every field validated in __post_init__."""

    model: str = DEFAULT_MODEL  # packaged name, local HF dir, .gguf file, or hub id
    # Entry points pass default_cache_dir() (which honours LORAPOOL_CACHE_DIR).
    cache_dir: Path = field(default_factory=lambda: store_settings.default_cache_dir({}))
    device: str = "cpu"
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    page_size: int = 16  # tokens per KV block; one block (every layer) is one page
    memory_mb: int = 768  # the page pool: KV cache and resident adapters, one budget
    num_pages: int | None = None  # pages in the pool (overrides memory_mb)
    host_cache_mb: int = 2048  # adapters parsed in host memory (LRU beyond)
    max_num_seqs: int = 64  # sequences running at once
    max_batch_tokens: int = 2048  # token budget per step (prefill chunks + decodes)
    max_model_len: int = 4096  # prompt + completion tokens per sequence
    max_lora_rank: int = 128
    quantize: str | None = None  # nf4 | fp4 | int8: the base's projections (bitsandbytes)
    compute_dtype: str = "auto"  # the quantized matmuls' dtype; auto: the model dtype
    # The adapters' stored dtype; auto: the model's. bfloat16 under a float32 model on the
    # CPU reads half the bytes per LoRA step (weights rounded once, at load; memory.pool).
    lora_dtype: str = "auto"
    # The CPU's decode LoRA in C (worker/kernels/lora_cpu.c, built into cache_dir/kernels
    # with the host's compiler); off, or with no compiler, the torch gathers run instead.
    cpu_kernels: bool = True
    # Decode steps replayed from CUDA graphs, one per batch bucket (worker/decode_graphs.py);
    # CUDA with an unquantized base only (bitsandbytes' kernels are not captured).
    cuda_graphs: bool = True
    # Speculative decoding (docs/speculative.md): the default of requests that do not choose.
    speculative: str = "none"  # none | ngram | draft
    num_speculative_tokens: int = 5  # γ: draft tokens per step, at most (1..16)
    draft_model: str | None = None  # a causal LM sharing the tokenizer (as `model`)
    draft_layers: int = 0  # keep the draft's first N layers and its head (0: all of them)
    speculative_adaptive: bool = True  # size each draft per step by acceptance and cost

    def __post_init__(self) -> None:
        positive = {
            "page_size": self.page_size,
            "memory_mb": self.memory_mb,
            "num_pages": 1 if self.num_pages is None else self.num_pages,
            "host_cache_mb": self.host_cache_mb,
            "max_num_seqs": self.max_num_seqs,
            "max_batch_tokens": self.max_batch_tokens,
            "max_model_len": self.max_model_len,
            "max_lora_rank": self.max_lora_rank,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(
                f"dtype must be auto, float32, bfloat16 or float16, not {self.dtype!r}"
            )
        if self.lora_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(
                f"lora_dtype must be auto, float32, bfloat16 or float16, not {self.lora_dtype!r}"
            )
        if self.quantize is not None:
            quant_kind(self.quantize)  # an unsupported name fails here, by name
        if self.compute_dtype != "auto" and self.compute_dtype not in COMPUTE_DTYPES:
            choices = ", ".join(COMPUTE_DTYPES)
            raise ValueError(f"compute_dtype must be auto, {choices}; not {self.compute_dtype!r}")
        self._check_speculative()

    def _check_speculative(self) -> None:
        SpecMethod(self.speculative)  # an unknown method fails here, by name
        if not 1 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"num_speculative_tokens must be in [1, {MAX_SPECULATIVE_TOKENS}]")
        if self.draft_layers < 0:
            raise ValueError(f"draft_layers must be >= 0, got {self.draft_layers}")
        if self.speculative == SpecMethod.DRAFT and self.draft_model is None:
            raise ValueError("speculative=draft needs a draft_model")
