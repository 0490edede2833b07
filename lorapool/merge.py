"""`lorapool-admin merge NAME[:VERSION] --out DIR [--qlora|--no-qlora]`: an adapter of the
registry merged into the base model, written as a standalone HF model directory.

For each projection the adapter targets (W [out, in], A [r, in], B [out, r], scale s):
  plain merge   W' = W + s·B·A                     in the base's own dtype
  QLoRA merge   W' = dq_c(q(W_c)) + s·B·A          in the compute dtype c, the whole model in c
where q is the quantization the adapter was trained on (nf4 unless it records another) of
W cast to c, and dq_c dequantizes to c: the weights the adapter was trained against, so the
merged model computes what the unmerged adapter on its quantized base computes
(bench/qlora_merge.py measures both). Sums in float64, rounded once. `--qlora` is the
default when the adapter records a 4-bit base. The adapter is read by the one parser
(adapter_store.validation) and turned into tensors by the worker's `to_host`, whose scale is
AdapterConfig.scale_for: no third copy of the LoRA scale here.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from safetensors import safe_open
from safetensors.torch import save_file
from sqlalchemy.orm import Session, sessionmaker

from adapter_store import repository
from adapter_store.basemodel import PARENT, BaseModelSpec
from adapter_store.blobs import open_blob_store
from adapter_store.errors import AdapterStoreError
from adapter_store.quantconfig import FOUR_BIT_TYPES, BaseQuantization
from adapter_store.settings import StoreSettings
from adapter_store.validation import ValidatedAdapter, read_blob
from worker.lora.adapter import HostLora, to_host
from worker.model.quant import NotQuantizableError, Quantization, compute_dtype, quant_kind

QLORA_DEFAULT_COMPUTE = "bfloat16"  # QLoRA's, when the adapter records none
MERGE_INFO = "lorapool_merge.json"
Advance = Callable[[], None]


class MergeError(AdapterStoreError):
    """The merge cannot be done as asked; the message says why."""


@dataclass(frozen=True)
class MergeSource:
    """The registry row's facts the merge needs (read inside one session)."""

    ref: str
    digest: str
    base_fingerprint: str


def qlora_quantization(
    trained: BaseQuantization | None, qlora: bool | None, kind: str | None, compute: str | None
) -> Quantization | None:
    """The quantization to reproduce (None: a plain merge). `qlora` None: the default, which
    is QLoRA when the adapter records a 4-bit base; `kind`/`compute` override the record."""
    if qlora is None:
        qlora = trained is not None and trained.method in FOUR_BIT_TYPES
    if not qlora:
        return None
    if trained is not None and not trained.is_bitsandbytes and kind is None:
        raise MergeError(
            f"the adapter was trained on a {trained.method} base, which bitsandbytes cannot "
            f"reproduce: merge with --no-qlora, or name one with --quantization"
        )
    recorded = trained if trained is not None and trained.is_bitsandbytes else None
    name = kind or (recorded.method if recorded else "nf4")
    dtype = compute or (recorded and recorded.compute_dtype) or QLORA_DEFAULT_COMPUTE
    double = recorded.double_quant if recorded is not None and name == recorded.method else False
    try:
        return Quantization(quant_kind(name), compute_dtype(dtype, torch.float32), double)
    except ValueError as exc:
        raise MergeError(str(exc)) from exc


def merge_into(
    base_dir: Path,
    adapter: ValidatedAdapter,
    out: Path,
    quantization: Quantization | None,
    advance: Advance,
) -> int:
    """Write the merged model into `out` (absent or empty); the number of merged modules."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MergeError(f"--out {out} exists and is not an empty directory")
    host = to_host(adapter, torch.float64)  # (layer, module) -> A [r, in], s·Bᵀ [r, out]
    by_name = {f"model.layers.{layer}.{PARENT[m]}.{m}.weight": w for (layer, m), w in host.items()}
    files = sorted(base_dir.glob("*.safetensors"))
    if not files:
        raise MergeError(f"no *.safetensors weights in {base_dir}")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        merged = sum(_merge_file(f, staging, by_name, quantization, advance) for f in files)
        if merged != len(by_name):
            raise MergeError(f"the base checkpoint lacks {len(by_name) - merged} adapted weights")
        _write_config(base_dir, staging, quantization)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return merged


def _merge_file(
    path: Path,
    staging: Path,
    by_name: dict[str, HostLora],
    quantization: Quantization | None,
    advance: Advance,
) -> int:
    tensors: dict[str, torch.Tensor] = {}
    merged = 0
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            weight = f.get_tensor(name)
            lora = by_name.get(name)
            if lora is not None:
                weight = merge_weight(weight, lora, quantization)
                merged += 1
                advance()
            elif quantization is not None and weight.is_floating_point():
                weight = weight.to(quantization.compute_dtype)
            tensors[name] = weight.contiguous()
    save_file(tensors, str(staging / path.name), metadata={"format": "pt"})
    return merged


def merge_weight(
    weight: torch.Tensor,  # [out, in]
    lora: HostLora,  # a [r, in], b = s·Bᵀ [r, out] in float64
    quantization: Quantization | None,
) -> torch.Tensor:  # [out, in]: the base's dtype (plain) or the compute dtype (QLoRA)
    delta = lora.b.t() @ lora.a  # [out, in] float64: s·B·A
    if quantization is None:
        return (weight.double() + delta).to(weight.dtype)
    from worker.model.quant_bnb import roundtrip  # bitsandbytes: only for a QLoRA merge

    base = roundtrip(weight, quantization)  # [out, in] in the compute dtype
    return (base.double() + delta).to(quantization.compute_dtype)


def _write_config(base_dir: Path, staging: Path, quantization: Quantization | None) -> None:
    """config.json (dtype = the compute dtype after a QLoRA merge), tokenizer and the rest."""
    for item in base_dir.iterdir():
        if item.is_file() and item.suffix != ".safetensors" and not item.name.startswith("."):
            shutil.copy2(item, staging / item.name)
    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    if quantization is not None:
        name = str(quantization.compute_dtype).removeprefix("torch.")
        config["dtype"] = name
        config.pop("torch_dtype", None)
    (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def describe(quantization: Quantization | None) -> dict[str, object]:
    if quantization is None:
        return {"mode": "plain"}
    return {
        "mode": "qlora",
        "quantization": quantization.name,
        "compute_dtype": str(quantization.compute_dtype).removeprefix("torch."),
        "double_quant": quantization.double_quant,
    }


def cmd_merge(
    settings: StoreSettings, factory: sessionmaker[Session], args: argparse.Namespace
) -> None:
    """The CLI command (adapter_store.cli runs it with its settings and error handling)."""
    base = BaseModelSpec.from_hf_dir(settings.base_model_dir)
    if base.quantization is not None:
        raise MergeError(
            f"the base model at {settings.base_model_dir} is stored quantized "
            f"({base.quantization}); a merge needs its full-precision weights"
        )
    with factory() as session:
        row = repository.resolve(session, args.ref)
        source = MergeSource(row.ref, row.digest, row.base_fingerprint)
    if source.base_fingerprint != base.fingerprint:
        raise MergeError(
            f"adapter {source.ref} was uploaded for another base model (fingerprint "
            f"{source.base_fingerprint}); the base model at {settings.base_model_dir} has "
            f"{base.fingerprint}: pass the base it was trained for with --base-model-dir"
        )
    with tempfile.TemporaryDirectory(prefix="lorapool-merge-") as tmp:
        blob = Path(tmp) / f"{source.digest}.safetensors"
        open_blob_store(settings).fetch_to(source.digest, blob)
        adapter = read_blob(blob, base, settings.max_rank)
    trained = adapter.parsed.base_quantization
    quantization = qlora_quantization(trained, args.qlora, args.quantization, args.compute_dtype)
    try:
        count = _merge_with_progress(
            settings.base_model_dir, adapter, args.out, quantization, source
        )
    except NotQuantizableError as exc:
        raise MergeError(f"cannot reproduce the training quantization: {exc}") from exc
    how = describe(quantization)
    sys.stdout.write(f"{source.ref} merged into {args.out}: {count} modules, {how}\n")


def _merge_with_progress(
    base_dir: Path,
    adapter: ValidatedAdapter,
    out: Path,
    quantization: Quantization | None,
    source: MergeSource,
) -> int:
    console = Console(stderr=True)
    with Progress(console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(f"merge {source.ref}", total=len(adapter.modules))
        count = merge_into(base_dir, adapter, out, quantization, lambda: bar.advance(task))
    info = {"adapter": source.ref, "digest": source.digest, **describe(quantization)}
    (out / MERGE_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return count
