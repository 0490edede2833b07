"""Every tensor a step builds is on the model's device (ARCHITECTURE.md §7, issue 9).

No GPU here, so the model goes to the `meta` device and a dispatch mode checks every
aten op of a step: each tensor argument (and generator) must be on `meta`, except
explicit transfers (the runner stages index lists on the host and moves them once) and
0-dim host scalars, which PyTorch itself allows. A CPU index tensor reaching index_add_,
a CPU generator reaching multinomial, a mask or table left on the host: each fails here
the way it would on CUDA.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from adapter_store.basemodel import BaseModelSpec
from tests.adapter_store.builders import write_lora
from worker import engine as engine_module
from worker.config import EngineConfig
from worker.drafting import draft_draw
from worker.engine import Engine
from worker.model.loader import load_model, load_tokenizer
from worker.sampling import sample_tensor
from worker.sequence import SamplingParams, ScheduledSeq
from worker.speculative.verify import verify_rows

META = torch.device("meta")
aten = torch.ops.aten
TRANSFERS = {aten._to_copy.default, aten.copy_.default, aten.lift_fresh.default}


class OnDevice(TorchDispatchMode):
    """Fails any aten op that mixes devices: a host tensor (not a 0-dim scalar) or a host
    generator beside a tensor on `device`. Host-only ops (staging index lists) and explicit
    transfers pass; at least `device_ops` ops must run on the device."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.device_ops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        leaves = list(_leaves((args, kwargs)))
        tensors = [v for v in leaves if isinstance(v, torch.Tensor)]
        on_device = any(t.device == self.device for t in tensors)
        if on_device and func not in TRANSFERS:
            self.device_ops += 1
            for t in tensors:
                if t.device != self.device and not (t.dim() == 0 and t.device.type == "cpu"):
                    raise AssertionError(f"{func} mixes {self.device} with a tensor on {t.device}")
            for g in (v for v in leaves if isinstance(v, torch.Generator)):
                if g.device != self.device:
                    raise AssertionError(f"{func} got a generator on {g.device}")
        return func(*args, **kwargs)


def _leaves(value: Any) -> Iterator[Any]:
    if isinstance(value, list | tuple):
        for item in value:
            yield from _leaves(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _leaves(item)
    else:
        yield value


def tensors_of(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor held by a (nested) dataclass of per-step inputs."""
    if isinstance(value, torch.Tensor):
        yield value
    elif is_dataclass(value) and not isinstance(value, type):
        for f in fields(value):
            yield from tensors_of(getattr(value, f.name))
    elif isinstance(value, list | tuple):
        for item in value:
            yield from tensors_of(item)


@pytest.fixture
def meta_engine(tmp_path: Path, tiny_model: Callable[..., Path]) -> Engine:
    base = tiny_model("llama")
    model = load_model(base, META, torch.float32)
    engine = Engine(EngineConfig(model=str(base), num_pages=64), model, load_tokenizer(base))
    spec = BaseModelSpec.from_hf_dir(base)
    for i, r in enumerate((4, 8)):
        engine.register_adapter(f"a{i}", write_lora(tmp_path / f"a{i}", spec, seed=i, r=r))
    return engine


def test_a_step_keeps_every_tensor_on_the_models_device(meta_engine: Engine) -> None:
    engine = meta_engine
    seeded = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=3, max_tokens=4)
    engine.add_request("base", [5, 6, 7, 8], SamplingParams(max_tokens=4))
    engine.add_request("a0", [9, 10, 11], seeded, "a0")
    engine.add_request("a1", [12, 13], SamplingParams(temperature=1.0, max_tokens=4), "a1")
    for adapter in ("a0", "a1"):
        _wait_on_host(engine, adapter)
    for _ in range(2):  # a prefill step, then a decode step (each sequence its own adapter)
        batch = engine.scheduler.schedule()
        assert len(batch) == 3
        check = OnDevice(META)
        with check:
            ordered, logits = engine.runner.run(batch, engine.adapters.get)
            seqs = [item.seq for item in ordered if item.samples]
            tokens = sample_tensor(
                logits, [s.sampling for s in seqs], [len(s.output_ids) for s in seqs]
            )
        assert check.device_ops > 100 and logits.device == META and tokens.device == META
        for item in ordered:  # what postprocess would do, with a stand-in token
            item.seq.num_computed += item.num_tokens
            item.seq.output_ids.append(7)


def test_the_kernel_paths_per_step_metadata_is_built_on_the_device(meta_engine: Engine) -> None:
    engine = meta_engine
    engine.runner.paged = True  # what a CUDA runner builds for the Triton kernels
    engine.add_request("base", [5, 6, 7, 8], SamplingParams(max_tokens=4))
    engine.add_request("a1", [12, 13], SamplingParams(max_tokens=4), "a1")
    _wait_on_host(engine, "a1")
    forward = engine.runner.prepare(engine.scheduler.schedule(), engine.adapters.get)
    assert forward.paged is not None and forward.lora is not None and forward.lora.meta
    held = list(tensors_of(forward))
    assert len(held) >= 15
    assert {t.device for t in held} == {META}


def _wait_on_host(engine: Engine, adapter_id: str) -> None:
    import time

    deadline = time.monotonic() + 60
    while not engine.adapters.ready(adapter_id):
        assert engine.adapters.error(adapter_id) is None, engine.adapters.error(adapter_id)
        assert time.monotonic() < deadline, f"{adapter_id} never loaded"
        time.sleep(0.001)


def test_a_speculative_step_keeps_every_tensor_on_the_models_device(meta_engine: Engine) -> None:
    """Verification rows (greedy and sampled, base and adapter rows, drafts of two lengths),
    the inputs of speculative sampling, and a draft model's draws: all on the device."""
    engine = meta_engine
    seeded = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=3, max_tokens=8)
    engine.add_request("base", [5, 6, 7, 8], SamplingParams(max_tokens=8))
    engine.add_request("a0", [9, 10, 11], seeded, "a0")
    engine.add_request("a1", [12, 13], SamplingParams(temperature=1.0, max_tokens=8), "a1")
    for adapter in ("a0", "a1"):
        _wait_on_host(engine, adapter)
    for item in engine.scheduler.schedule():  # the prefill, with a stand-in first token
        item.seq.num_computed += item.num_tokens
        item.seq.output_ids.append(7)
    drafts = {"base": (3, 4), "a0": (5, 6, 7), "a1": (8, 9)}
    batch = [
        ScheduledSeq(item.seq, 1 + len(drafts[item.seq.request_id]), drafts[item.seq.request_id])
        for item in engine.scheduler.schedule()
    ]
    for item in batch:
        engine.blocks.grow(item.seq, item.num_tokens)
    check = OnDevice(META)
    with check:
        ordered, logits = engine.runner.run(batch, engine.adapters.get)
        rows, row = [], 0
        for item in ordered:
            if not item.seq.sampling.greedy:
                rows.append((item, row))
            row += item.num_logits
        accept, token = verify_rows(*engine.speculator.verify_inputs(rows, logits))
        seqs = [item.seq for item in ordered]
        drawn, q = draft_draw(logits[: len(seqs)], seqs, [1] * len(seqs))
    assert logits.shape[0] == sum(1 + len(d) for d in drafts.values())
    assert check.device_ops > 100 and {accept.device, token.device, drawn.device} == {META}
    assert q is not None and q.device == META


def test_a_step_runs_with_the_models_cuda_device_current(
    tiny_model: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Triton launches on the current CUDA device: an engine on cuda:1 makes it current
    scope = engine_module.device_scope(torch.device("cuda", 1))
    assert isinstance(scope, torch.cuda.device) and scope.idx == 1
    entered: list[torch.device] = []

    def recording(device: torch.device) -> Any:
        entered.append(device)
        return contextlib.nullcontext()

    monkeypatch.setattr(engine_module, "device_scope", recording)
    engine = Engine.from_config(EngineConfig(model=str(tiny_model("llama"))))
    engine.add_request("r", [5, 6, 7], SamplingParams(max_tokens=2))
    engine.step()
    assert entered == [torch.device("cpu")]
