"""EngineConfig.lora_dtype: which stored dtypes each model and device accept, and how the
worker's flags and environment choose it (the numbers are test_lora_parity's and
test_lora_cpu's)."""

from __future__ import annotations

import pytest
import torch

from worker.__main__ import engine_config, parser
from worker.config import EngineConfig
from worker.memory.pool import lora_dtype_for

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    ("name", "model", "device", "stored"),
    [
        ("auto", torch.float32, CPU, torch.float32),
        ("auto", torch.bfloat16, CUDA, torch.bfloat16),
        ("float32", torch.float32, CPU, torch.float32),
        ("bfloat16", torch.float32, CPU, torch.bfloat16),
        ("bfloat16", torch.bfloat16, CUDA, torch.bfloat16),
        ("float16", torch.float16, CUDA, torch.float16),
    ],
)
def test_accepted_combinations(
    name: str, model: torch.dtype, device: torch.device, stored: torch.dtype
) -> None:
    assert lora_dtype_for(name, model, device) == stored


@pytest.mark.parametrize(
    ("name", "model", "device"),
    [
        ("bfloat16", torch.float32, CUDA),  # the Triton kernels read the model's dtype
        ("float16", torch.float32, CPU),  # the C kernel widens bfloat16 only
        ("float32", torch.bfloat16, CUDA),  # wider than the model: nothing gained
        ("float16", torch.bfloat16, CUDA),
    ],
)
def test_refused_combinations_say_what_is_supported(
    name: str, model: torch.dtype, device: torch.device
) -> None:
    with pytest.raises(ValueError, match=f"lora_dtype {name} with a .* model on {device.type}"):
        lora_dtype_for(name, model, device)


def test_an_unknown_name_is_refused_by_the_config() -> None:
    with pytest.raises(ValueError, match="lora_dtype must be auto, float32, bfloat16 or float16"):
        EngineConfig(lora_dtype="int8")


def test_the_worker_takes_it_from_the_flag_or_the_environment() -> None:
    assert engine_config(parser().parse_args([]), {}).lora_dtype == "auto"
    env = {"LORAPOOL_LORA_DTYPE": "bfloat16"}
    assert engine_config(parser().parse_args([]), env).lora_dtype == "bfloat16"
    flag = parser().parse_args(["--lora-dtype", "float32"])
    assert engine_config(flag, env).lora_dtype == "float32"  # the flag wins
    with pytest.raises(SystemExit):
        parser().parse_args(["--lora-dtype", "int8"])
