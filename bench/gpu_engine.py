"""The engine part of `make gpu-check`: SmolLM2 in bf16 on CUDA against the CPU reference.

Adapters for the throughput cases are random HostAdapters handed to the engine through its
adapter loader (no files, no PEFT): ranks 8 and 16 alternating, all seven projections.

Each decode step is timed twice: `decode_step_ms`, the whole `engine.step()` (scheduling,
step tensors, the forward, sampling, detokenizing), and `forward_ms`, the device time of
the forward alone (CUDA events around the graph replay or the eager forward). For a 135M
model on a GPU the host's part may well be the larger one, and the bytes ceilings speak of
the device's: `lora_tax_gpu_*` and `base_step_over_bytes_floor` are taken from
`forward_ms`, and their `_wall` twins from `decode_step_ms`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from worker.config import EngineConfig
from worker.engine import Engine
from worker.lora.adapter import HostAdapter, HostLora
from worker.sequence import SamplingParams

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROWS, STEPS = 32, 24  # decode rows, timed steps


def engine_report(
    model: Path, samples: Path, prompts: list[str], copy_bytes_per_s: float, device: str = "cuda"
) -> dict[str, Any]:
    return {
        "sample_tokens": sample_tokens(model, samples, prompts, device),
        "throughput": throughput(model, copy_bytes_per_s, device),
    }


def sample_tokens(model: Path, samples: Path, prompts: list[str], device: str) -> dict[str, Any]:
    """Greedy tokens of each sample adapter (and the base) on the GPU in bf16 against the CPU
    in fp32: how many leading tokens agree (bf16 rounding may flip a near-tie later)."""
    runs = {}
    for where, dtype in (("cpu", "float32"), (device, "bfloat16")):
        engine = Engine.from_config(EngineConfig(model=str(model), device=where, dtype=dtype))
        names: list[str | None] = [None]
        for sample in sorted(p for p in samples.iterdir() if p.is_dir()):
            engine.register_adapter(sample.name, sample)
            names.append(sample.name)
        chats = [[{"role": "user", "content": text}] for text in prompts]
        jobs = [(c, n) for n in names for c in chats]
        results = engine.generate(
            [c for c, _ in jobs], SamplingParams(max_tokens=24), [n for _, n in jobs]
        )
        key = "reference" if dtype == "float32" else "device"
        runs[key] = [r.token_ids for r in results]
    agree = [_prefix(a, b) for a, b in zip(runs["reference"], runs["device"], strict=True)]
    return {
        "identical": sum(a == len(t) for a, t in zip(agree, runs["reference"], strict=True)),
        "sequences": len(agree),
        "leading_tokens_agreeing": agree,
    }


def throughput(model: Path, copy_bytes_per_s: float, device: str) -> dict[str, Any]:
    """Decode step times with CUDA graphs (the default) and without (eager launches)."""
    out: dict[str, Any] = {}
    step_s: dict[str, float] = {}
    forward_s: dict[str, float] = {}
    for graphs in (True, False):
        config = EngineConfig(
            model=str(model), device=device, dtype="bfloat16", max_num_seqs=ROWS, cuda_graphs=graphs
        )
        engine = Engine.from_config(config, adapter_loader=_random_adapter_loader(config))
        names = [f"a{i}" for i in range(ROWS)]
        for name in names:
            engine.register_adapter(name, Path(f"/random/{name}"))
        cases: dict[str, list[str | None]] = {
            "base": [None] * ROWS,
            "distinct": list(names),
            "shared": list(names[:4] * (ROWS // 4)),
        }
        times, forward = {}, {}
        for case, adapters in cases.items():
            times[case], forward[case] = _decode_step_seconds(engine, adapters)
        suffix = "" if graphs else "_eager"
        out["decode_step_ms" + suffix] = {c: round(t * 1000, 3) for c, t in times.items()}
        out["forward_ms" + suffix] = {c: round(t * 1000, 3) for c, t in forward.items()}
        if graphs:
            step_s, forward_s = times, forward
            stats = engine.runner.graphs.stats if engine.runner.graphs is not None else None
            out["cuda_graphs"] = None if stats is None else {
                "replays": stats.replays, "eager_steps": stats.eager, "captures": stats.captures,
                "failure": stats.failure,
            }  # fmt: skip
        else:
            out["graph_speedup"] = {
                c: round(t / step_s[c], 3) for c, t in times.items() if step_s.get(c)
            }
            out["graph_speedup_forward"] = {
                c: round(t / forward_s[c], 3) for c, t in forward.items() if forward_s.get(c)
            }
    base_bytes = _checkpoint_params(model) * 2  # bf16
    adapter_bytes = {case: _adapter_bytes(config, set(a) - {None}) for case, a in cases.items()}
    for case in ("distinct", "shared"):
        ceiling = base_bytes / (base_bytes + adapter_bytes[case])
        tax = forward_s["base"] / forward_s[case]
        out[f"lora_tax_gpu_{case}"] = round(tax, 3)
        out[f"lora_tax_gpu_{case}_ceiling"] = round(ceiling, 3)
        out[f"lora_tax_gpu_{case}_of_ceiling"] = round(tax / ceiling, 3)
        out[f"lora_tax_gpu_{case}_wall"] = round(step_s["base"] / step_s[case], 3)
    # copy_bytes_per_s counts a copy's bytes read and written: the rate memory moves bytes
    # at. A step reads each weight once, so at best it moves base_bytes at that rate.
    floor_s = base_bytes / copy_bytes_per_s
    out["base_step_over_bytes_floor"] = round(forward_s["base"] / floor_s, 2)
    out["base_step_over_bytes_floor_wall"] = round(step_s["base"] / floor_s, 2)
    out["base_weight_bytes"] = base_bytes
    out["adapter_bytes_per_step"] = adapter_bytes
    return out


class ForwardClock:
    """Device time of each step's forward: CUDA events around the decode graphs' `run` and
    the model's `forward` (the eager path), patched on the instances while in use;
    perf_counter off CUDA. A call inside another timed call (an eager replay inside `run`)
    and a call during a graph capture (where an event may not be recorded) go untimed."""

    def __init__(self, engine: Engine) -> None:
        runner = engine.runner
        self.cuda = runner.model.device.type == "cuda"
        self.calls: list[Callable[[], float]] = []  # ms of each timed call, once synced
        self._targets: list[tuple[Any, str]] = [(runner.model, "forward")]
        if runner.graphs is not None:
            self._targets.append((runner.graphs, "run"))
        self._depth = 0

    def __enter__(self) -> ForwardClock:
        for owner, name in self._targets:
            setattr(owner, name, self._timed(getattr(owner, name)))
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for owner, name in self._targets:
            delattr(owner, name)  # the instance attribute goes; the method shows again

    def take_ms(self) -> float:
        """The device time of the calls since the last take (after a synchronize)."""
        total = sum(read() for read in self.calls)
        self.calls.clear()
        return total

    def _timed(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._depth or (self.cuda and torch.cuda.is_current_stream_capturing()):
                return fn(*args, **kwargs)
            self._depth += 1
            try:
                if self.cuda:
                    start = torch.cuda.Event(enable_timing=True)
                    end = torch.cuda.Event(enable_timing=True)
                    start.record()
                    out = fn(*args, **kwargs)
                    end.record()
                    self.calls.append(lambda: start.elapsed_time(end))
                else:
                    t0 = time.perf_counter()
                    out = fn(*args, **kwargs)
                    ms = (time.perf_counter() - t0) * 1000
                    self.calls.append(lambda: ms)
            finally:
                self._depth -= 1
            return out

        return timed


def _decode_step_seconds(engine: Engine, adapters: list[str | None]) -> tuple[float, float]:
    """Median seconds of a decode step of these rows: the whole step, and its forward's
    device time."""
    sampling = SamplingParams(max_tokens=STEPS * 4, ignore_eos=True)
    for i, adapter in enumerate(adapters):
        engine.add_request(f"r{i}", [1, 2, 3, 4, 5, 6, 7, 8], sampling, adapter)
    deadline = time.monotonic() + 300
    while engine.scheduler.waiting or any(s.num_computed == 0 for s in engine.scheduler.running):
        engine.step()
        assert time.monotonic() < deadline, "adapters never became resident"
    engine.step()  # untimed: a decode step of this batch (with graphs, its capture)
    times, forward = [], []
    sync = torch.cuda.synchronize if engine.model.device.type == "cuda" else (lambda: None)
    with ForwardClock(engine) as clock:
        for _ in range(STEPS):
            sync()
            t0 = time.perf_counter()
            engine.step()
            sync()
            times.append(time.perf_counter() - t0)
            forward.append(clock.take_ms() / 1000)
    for i in range(len(adapters)):
        engine.cancel(f"r{i}")
    engine.step()
    return statistics.median(times), statistics.median(forward)


def _random_adapter_loader(config: EngineConfig) -> Any:
    def load(adapter_id: str, _source: Path) -> HostAdapter:
        index = int(adapter_id[1:])
        rank = 8 if index % 2 == 0 else 16
        gen = torch.Generator().manual_seed(index)
        shapes = _shapes(config)
        modules = {
            (layer, m): HostLora(
                (torch.randn(rank, shapes[m][0], generator=gen) * 0.02).to(torch.bfloat16),
                (torch.randn(rank, shapes[m][1], generator=gen) * 0.02).to(torch.bfloat16),
            )
            for layer in range(shapes["layers"])
            for m in MODULES
        }
        return HostAdapter(
            adapter_id, modules, sum(w.a.nbytes + w.b.nbytes for w in modules.values())
        )

    return load


def _shapes(config: EngineConfig) -> dict[str, Any]:
    from transformers import AutoConfig

    from worker.model.config import model_config_from_hf

    spec = model_config_from_hf(AutoConfig.from_pretrained(config.model)).spec
    return {m: spec.module_shape(m) for m in MODULES} | {"layers": spec.num_layers}


def _checkpoint_params(model: Path) -> int:
    """Parameters in the checkpoint (a tied lm_head is stored once): the bytes a step reads."""
    from safetensors import safe_open

    total = 0
    for path in sorted(model.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                shape = f.get_slice(name).get_shape()
                count = 1
                for dim in shape:
                    count *= dim
                total += count
    return total


def _adapter_bytes(config: EngineConfig, adapters: set[str | None]) -> int:
    """bf16 bytes of the distinct adapters a decode step reads (rank · Σ(in + out) · L each)."""
    shapes = _shapes(config)
    per_rank = shapes["layers"] * sum(i + o for i, o in (shapes[m] for m in MODULES))
    ranks = [8 if int(a[1:]) % 2 == 0 else 16 for a in adapters if a is not None]
    return sum(ranks) * per_rank * 2


def _prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
