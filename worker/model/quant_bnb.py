"""bitsandbytes projections: NF4/FP4 (4-bit) and LLM.int8(), quantized at load or read from a
pre-quantized transformers checkpoint; and the quantize → dequantize round trip of a merge.

Imported only when a model is quantized (a host without bitsandbytes serves dense models).
The calls are the ones transformers' bnb layers make (bnb.matmul_4bit, bnb.matmul), so a
model here computes what `from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`
computes on the same weights (tests/worker/test_quant_parity.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
from bitsandbytes.autograd._functions import MatmulLtState

from worker.model.linear import Linear, cat_bias
from worker.model.quant import NotQuantizableError, Quantization, check_quantizable

Tensors = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Linear4bit:
    """W [out, in] as 4-bit codes; y = x_c · dequant(W)ᵀ (+ b) in the compute dtype c."""

    packed: torch.Tensor  # [out·in/2, 1] uint8: two codes a byte, W row-major
    state: bnbf.QuantState  # absmax [out·in/blocksize] fp32, code [16], shape (out, in)
    compute_dtype: torch.dtype
    bias: torch.Tensor | None = None  # [out] in the compute dtype

    @property
    def in_features(self) -> int:
        return int(self.state.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.state.shape[0])

    @property
    def nbytes(self) -> int:
        state, extra = self.state, 0
        if state.nested:
            extra = state.state2.absmax.nbytes + state.state2.code.nbytes
        bias = 0 if self.bias is None else self.bias.nbytes
        return self.packed.nbytes + state.absmax.nbytes + state.code.nbytes + extra + bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        y = bnb.matmul_4bit(x.to(self.compute_dtype), self.packed.t(), self.state, bias=self.bias)
        return y.to(x.dtype)

    @classmethod
    def concat(cls, parts: Sequence[Linear4bit]) -> Linear4bit:
        """Rows stacked: codes and absmax end to end (exact, as every block lies in one row)."""
        states = [_flat(p.state) for p in parts]
        first = states[0]
        same = {(s.quant_type, s.blocksize, s.dtype, int(s.shape[1])) for s in states}
        whole_blocks = int(first.shape[1]) % first.blocksize == 0
        if len(same) != 1 or len({p.compute_dtype for p in parts}) != 1 or not whole_blocks:
            raise NotQuantizableError(
                f"cannot fuse 4-bit projections: rows must hold whole blocks and the parts "
                f"must share their quantization; (type, blocksize, dtype, in): {list(same)}"
            )
        state = bnbf.QuantState(
            absmax=torch.cat([s.absmax for s in states]),
            shape=torch.Size([sum(int(s.shape[0]) for s in states), int(first.shape[1])]),
            code=first.code,
            blocksize=first.blocksize,
            quant_type=first.quant_type,
            dtype=first.dtype,
        )
        packed = torch.cat([p.packed for p in parts])
        return cls(packed, state, parts[0].compute_dtype, cat_bias(parts))


@dataclass(frozen=True)
class Linear8bit:
    """W [out, in] as int8 rows; LLM.int8(): x's outlier columns (|x| > threshold) in 16-bit."""

    codes: torch.Tensor  # [out, in] int8: W[i] ≈ codes[i] · scales[i] / 127
    scales: torch.Tensor  # [out] float32: each row's absmax (bnb's SCB)
    compute_dtype: torch.dtype
    threshold: float
    bias: torch.Tensor | None = None  # [out] in the compute dtype

    @property
    def in_features(self) -> int:
        return int(self.codes.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.codes.shape[0])

    @property
    def nbytes(self) -> int:
        return (
            self.codes.nbytes + self.scales.nbytes + (0 if self.bias is None else self.bias.nbytes)
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        state = MatmulLtState()  # per call: bnb writes the step's outlier columns into it
        state.CB, state.SCB, state.threshold = self.codes, self.scales, self.threshold
        state.has_fp16_weights, state.is_training = False, False
        y = bnb.matmul(x.to(self.compute_dtype), self.codes, state=state, bias=self.bias)
        return y.to(x.dtype)

    @classmethod
    def concat(cls, parts: Sequence[Linear8bit]) -> Linear8bit:
        first = parts[0]
        codes = torch.cat([p.codes for p in parts])
        scales = torch.cat([p.scales for p in parts])
        return cls(codes, scales, first.compute_dtype, first.threshold, cat_bias(parts))


def quantize(name: str, weight: torch.Tensor, bias: torch.Tensor | None, q: Quantization) -> Linear:
    """Quantize one projection (weight [out, in], on its device) as transformers' bnb would."""
    check_quantizable(name, weight, q.kind)
    return QUANTIZERS[q.kind.bits](weight.contiguous(), _bias(bias, q), q)


def _quantize_4bit(weight: torch.Tensor, bias: torch.Tensor | None, q: Quantization) -> Linear:
    packed, state = bnbf.quantize_4bit(
        weight,
        blocksize=q.kind.blocksize,
        compress_statistics=q.double_quant,
        quant_type=q.kind.name,
        quant_storage=torch.uint8,
    )
    return Linear4bit(packed, state, q.compute_dtype, bias)


def _quantize_8bit(weight: torch.Tensor, bias: torch.Tensor | None, q: Quantization) -> Linear:
    codes, scales, _ = bnbf.int8_vectorwise_quant(weight.to(torch.float16))
    _quiet_int8_cast_notice()
    return Linear8bit(codes, scales, q.compute_dtype, q.int8_threshold, bias)


# bits -> quantizer: a table, not a chain of ifs.
QUANTIZERS: dict[int, Callable[[torch.Tensor, torch.Tensor | None, Quantization], Linear]] = {
    4: _quantize_4bit,
    8: _quantize_8bit,
}


def read_quantized(
    tensors: Tensors, name: str, bias: torch.Tensor | None, q: Quantization, device: torch.device
) -> Linear:
    """One projection of a pre-quantized transformers checkpoint (`name` = its module path)."""
    weight = tensors.get(f"{name}.weight")
    if weight is None:
        raise ValueError(f"checkpoint lacks tensor {name + '.weight'!r}")
    return READERS[q.kind.bits](tensors, name, weight.to(device), _bias(bias, q), q)


def _read_4bit(
    tensors: Tensors, name: str, packed: torch.Tensor, bias: torch.Tensor | None, q: Quantization
) -> Linear:
    prefix = f"{name}.weight."  # absmax, quant_map, quant_state.bitsandbytes__nf4, nested_*
    stats = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    if packed.dtype != torch.uint8 or not stats:
        raise NotQuantizableError(f"{name}: a 4-bit checkpoint needs packed uint8 weights")
    state = bnbf.QuantState.from_dict(stats, packed.device)
    return Linear4bit(packed, state, q.compute_dtype, bias)


def _read_8bit(
    tensors: Tensors, name: str, codes: torch.Tensor, bias: torch.Tensor | None, q: Quantization
) -> Linear:
    scales = tensors.get(f"{name}.SCB")
    if codes.dtype != torch.int8 or scales is None:
        raise NotQuantizableError(f"{name}: an int8 checkpoint needs int8 weights and SCB")
    _quiet_int8_cast_notice()
    return Linear8bit(codes, scales.to(codes.device), q.compute_dtype, q.int8_threshold, bias)


Reader = Callable[[Tensors, str, torch.Tensor, torch.Tensor | None, Quantization], Linear]
READERS: dict[int, Reader] = {4: _read_4bit, 8: _read_8bit}  # bits -> reader


def roundtrip(weight: torch.Tensor, q: Quantization) -> torch.Tensor:
    """W [out, in] → quantize (from the compute dtype) → dequantize to the compute dtype.

    The weights a QLoRA run trained against: a merge adds the adapter to these.
    """
    layer = quantize("weight", weight.to(q.compute_dtype), None, q)
    if isinstance(layer, Linear8bit):
        return bnbf.int8_vectorwise_dequant(layer.codes, layer.scales).to(q.compute_dtype)
    assert isinstance(layer, Linear4bit)
    layer.state.dtype = q.compute_dtype  # dequantize straight to it, as the matmul does
    return bnbf.dequantize_4bit(layer.packed, layer.state)


def _bias(bias: torch.Tensor | None, q: Quantization) -> torch.Tensor | None:
    return None if bias is None else bias.to(q.compute_dtype)


def _flat(state: bnbf.QuantState) -> bnbf.QuantState:
    """A double-quantized state with its absmax dequantized (the values bnb uses): fusable."""
    if not state.nested:
        return state
    absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return bnbf.QuantState(
        absmax=absmax.float(),
        shape=state.shape,
        code=state.code,
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        dtype=state.dtype,
    )


class _DropInt8CastNotice(logging.Filter):
    """bnb logs one line per int8 matmul whose input is not float16; once is plenty."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


_INT8_NOTICE = _DropInt8CastNotice()


def _quiet_int8_cast_notice() -> None:
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if _INT8_NOTICE not in logger.filters:
        logger.addFilter(_INT8_NOTICE)
