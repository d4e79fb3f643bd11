"""Dynamic int8 linear: the torch reference op, its module, and its ONNX lowering.

Activations are quantized at run time per tensor to uint8 (asymmetric, as ONNX's
``DynamicQuantizeLinear``); weights are int8, symmetric, per output channel. The torch
op reproduces ONNX Runtime's arithmetic (round half to even, exact int32 accumulation),
so both backends agree up to float rounding.
"""
from __future__ import annotations

import torch
from onnxscript import FLOAT
from onnxscript import opset18 as op
from torch import nn


@torch.library.custom_op("presso::dynamic_int8_linear", mutates_args=())
def dynamic_int8_linear(x: torch.Tensor, weight_t: torch.Tensor, weight_scale: torch.Tensor,
                        bias: torch.Tensor) -> torch.Tensor:
    """``x @ dequant(weight_t) + bias`` with ``x`` quantized dynamically to uint8."""
    lo = torch.clamp(x.min(), max=0.0)
    hi = torch.clamp(x.max(), min=0.0)
    scale = (hi - lo) / 255.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero_point = torch.clamp(torch.round(-lo / scale), 0, 255)
    xq = torch.clamp(torch.round(x / scale) + zero_point, 0, 255)
    # integer products below 2**24 per term; float64 accumulation is exact for these sizes
    acc = torch.matmul((xq - zero_point).double(), weight_t.double())
    return (acc * (scale.double() * weight_scale.double())).to(x.dtype) + bias


@dynamic_int8_linear.register_fake
def _(x, weight_t, weight_scale, bias):
    return x.new_empty((*x.shape[:-1], weight_t.shape[1]))


def dynamic_int8_linear_onnx(x: FLOAT, weight_t, weight_scale: FLOAT, bias: FLOAT) -> FLOAT:
    """Standard ONNX operators; ONNX Runtime fuses them into an integer matmul kernel."""
    xq, x_scale, x_zero_point = op.DynamicQuantizeLinear(x)
    acc = op.MatMulInteger(xq, weight_t, x_zero_point)
    return op.Add(op.Mul(op.Cast(acc, to=1), op.Mul(x_scale, weight_scale)), bias)


def quantize_per_channel_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: ``weight ~= q * scale[:, None]``."""
    absmax = weight.detach().abs().amax(dim=1).float()
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    q = torch.clamp(torch.round(weight.detach().float() / scale[:, None]), -127, 127).to(torch.int8)
    return q, scale


class DynamicInt8Linear(nn.Module):
    """Drop-in for ``nn.Linear``: int8 weight (stored transposed, K x N), float scale and bias."""

    def __init__(self, weight_t: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor,
                 has_bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = weight_t.shape
        self.has_bias = has_bias  # a zero bias stands in when the original had none
        self.register_buffer("weight_t", weight_t)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("bias", bias)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> "DynamicInt8Linear":
        """``weight`` is (out_features, in_features), as in ``nn.Linear``."""
        q, scale = quantize_per_channel_int8(weight)
        has_bias = bias is not None
        bias = bias.detach().float().clone() if has_bias else torch.zeros(weight.shape[0])
        return cls(q.t().contiguous(), scale, bias, has_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dynamic_int8_linear(x, self.weight_t, self.weight_scale, self.bias)

    def logical_params(self) -> int:
        """Weights and bias as an ``nn.Linear`` counts them."""
        return self.in_features * self.out_features + (self.out_features if self.has_bias else 0)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 dynamic"
