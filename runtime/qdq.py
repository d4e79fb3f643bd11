"""Static int8: quantize/dequantize pairs around linears and convolutions.

Activations get one calibrated scale and zero point per tensor (uint8 asymmetric or int8
symmetric); weights are int8 per output channel. The ops lower to ONNX
``QuantizeLinear``/``DequantizeLinear``, which ONNX Runtime fuses with the following
``MatMul``/``Conv`` into integer kernels (``MatMulIntegerToFloat``, ``QLinearConv``).
The torch reference computes the same dequantized values and a float matmul.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from onnxscript import FLOAT
from onnxscript import opset18 as op
from torch import nn

from presso.runtime.int8 import UINT8_128, as_float32, as_uint8, quantize_per_channel_int8, same_dtype


@torch.library.custom_op("presso::quantize_dequantize", mutates_args=())
def quantize_dequantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Round ``x`` to the int8/uint8 grid of ``scale``/``zero_point`` (0-d tensors) and back."""
    info = torch.iinfo(zero_point.dtype)
    zp = zero_point.float()
    q = torch.clamp(torch.round(x.float() / scale) + zp, info.min, info.max)  # round half to even, as ONNX
    return ((q - zp) * scale).to(x.dtype)


@quantize_dequantize.register_fake
def _(x, scale, zero_point):
    return torch.empty_like(x)


@torch.library.custom_op("presso::dequantize_per_channel", mutates_args=())
def dequantize_per_channel(q: torch.Tensor, scale: torch.Tensor, axis: int) -> torch.Tensor:
    """int8 ``q`` times one scale per slice along ``axis``."""
    shape = [1] * q.dim()
    shape[axis] = -1
    return q.float() * scale.view(shape)


@dequantize_per_channel.register_fake
def _(q, scale, axis):
    return torch.empty(q.shape, dtype=scale.dtype, device=q.device)


def quantize_dequantize_onnx(x: FLOAT, scale: FLOAT, zero_point) -> FLOAT:
    return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point), scale, zero_point)


def dequantize_per_channel_onnx(q, scale: FLOAT, axis: int = 0) -> FLOAT:
    """int8 weight codes shifted to uint8 with zero point 128: ONNX Runtime then fuses the
    Q/DQ matmul into its u8 x u8 kernels, exact on every CPU (see ``int8.as_uint8``)."""
    zero_point = op.Expand(op.Constant(value=UINT8_128), op.Shape(scale))
    return op.DequantizeLinear(as_uint8(q), scale, zero_point, axis=axis)


class ActivationQuant(nn.Module):
    """A calibrated per-tensor scale and zero point (uint8 when asymmetric, int8 when symmetric)."""

    def __init__(self, scale: float, zero_point: int, symmetric: bool):
        super().__init__()
        self.symmetric = symmetric
        self.register_buffer("scale", torch.tensor(float(scale)))
        dtype = torch.int8 if symmetric else torch.uint8
        self.register_buffer("zero_point", torch.tensor(int(zero_point), dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantize_dequantize(x, self.scale, self.zero_point)

    def extra_repr(self) -> str:
        kind = "int8" if self.symmetric else "uint8"
        return f"scale={self.scale.item():.4g}, zero_point={self.zero_point.item()}, {kind}"


class StaticInt8Linear(nn.Module):
    """``nn.Linear`` with Q/DQ on its input and an int8 weight (stored K x N, per-column scales)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, act: ActivationQuant):
        super().__init__()
        q, scale = quantize_per_channel_int8(weight)
        self.out_features, self.in_features = weight.shape
        self.input_quant = act
        self.register_buffer("weight_t", q.t().contiguous())
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(as_float32(self.input_quant(x)), dequantize_per_channel(self.weight_t, self.weight_scale, 1))
        return same_dtype(y if self.bias is None else y + self.bias, x)

    def logical_params(self) -> int:
        return self.in_features * self.out_features + (0 if self.bias is None else self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 static"


class StaticInt8Conv2d(nn.Module):
    """``nn.Conv2d`` with Q/DQ on its input and an int8 weight per output channel."""

    def __init__(self, conv: nn.Conv2d, act: ActivationQuant):
        super().__init__()
        w = conv.weight.detach()
        q, scale = quantize_per_channel_int8(w.reshape(w.shape[0], -1))
        self.input_quant = act
        self.register_buffer("weight", q.view(w.shape))
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().float().clone())
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode={conv.padding_mode!r} is not supported")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = dequantize_per_channel(self.weight, self.weight_scale, 0)
        y = F.conv2d(as_float32(self.input_quant(x)), w, self.bias, self.stride, self.padding, self.dilation,
                     self.groups)
        return same_dtype(y, x)

    def logical_params(self) -> int:
        return self.weight.numel() + (0 if self.bias is None else self.bias.numel())
