"""Dynamic int8 linear: torch reference ops, the module, and their ONNX lowerings.

Weights are int8, symmetric, per output channel. Activations are quantized at run time,
either per token (a symmetric int8 scale per row: robust to the outlier tokens of LLMs)
or per tensor (asymmetric uint8, ONNX's ``DynamicQuantizeLinear``). The torch ops
reproduce ONNX Runtime's arithmetic (round half to even, exact integer accumulation), so
both backends agree up to float rounding.
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


@torch.library.custom_op("presso::dynamic_int8_linear_per_token", mutates_args=())
def dynamic_int8_linear_per_token(x: torch.Tensor, weight_t: torch.Tensor, weight_scale: torch.Tensor,
                                  bias: torch.Tensor) -> torch.Tensor:
    """``x @ dequant(weight_t) + bias`` with each row of ``x`` quantized to int8 by its own scale."""
    scale = x.abs().amax(dim=-1, keepdim=True) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    xq = torch.clamp(torch.round(x / scale), -127, 127)
    acc = torch.matmul(xq.double(), weight_t.double())  # exact: |products| < 2**14, sums < 2**53
    return (acc * (scale.double() * weight_scale.double())).to(x.dtype) + bias


@dynamic_int8_linear.register_fake
@dynamic_int8_linear_per_token.register_fake
def _(x, weight_t, weight_scale, bias):
    return x.new_empty((*x.shape[:-1], weight_t.shape[1]))


def dynamic_int8_linear_onnx(x: FLOAT, weight_t, weight_scale: FLOAT, bias: FLOAT) -> FLOAT:
    """Standard ONNX operators; ONNX Runtime fuses them into an integer matmul kernel."""
    xq, x_scale, x_zero_point = op.DynamicQuantizeLinear(x)
    acc = op.MatMulInteger(xq, weight_t, x_zero_point)
    return op.Add(op.Mul(op.Cast(acc, to=1), op.Mul(x_scale, weight_scale)), bias)


def dynamic_int8_linear_per_token_onnx(x: FLOAT, weight_t, weight_scale: FLOAT, bias: FLOAT) -> FLOAT:
    """Per-row int8 scales, then an int8 x int8 ``MatMulInteger`` (integer kernel in ONNX Runtime)."""
    scale = op.Div(op.ReduceMax(op.Abs(x), op.Constant(value_ints=[-1]), keepdims=1), op.Constant(value_float=127.0))
    scale = op.Where(op.Greater(scale, op.Constant(value_float=0.0)), scale, op.Constant(value_float=1.0))
    xq = op.Cast(op.Clip(op.Round(op.Div(x, scale)), op.Constant(value_float=-127.0),
                         op.Constant(value_float=127.0)), to=3)  # INT8
    acc = op.MatMulInteger(xq, weight_t)
    return op.Add(op.Mul(op.Cast(acc, to=1), op.Mul(scale, weight_scale)), bias)


def quantize_per_channel_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: ``weight ~= q * scale[:, None]``."""
    absmax = weight.detach().abs().amax(dim=1).float()
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    q = torch.clamp(torch.round(weight.detach().float() / scale[:, None]), -127, 127).to(torch.int8)
    return q, scale


class DynamicInt8Linear(nn.Module):
    """Drop-in for ``nn.Linear``: int8 weight (stored transposed, K x N), float scale and bias."""

    def __init__(self, weight_t: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor,
                 has_bias: bool = True, per_token: bool = True):
        super().__init__()
        self.in_features, self.out_features = weight_t.shape
        self.has_bias = has_bias  # a zero bias stands in when the original had none
        self.per_token = per_token
        self.register_buffer("weight_t", weight_t)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("bias", bias)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, per_token: bool = True) -> "DynamicInt8Linear":
        """``weight`` is (out_features, in_features), as in ``nn.Linear``."""
        q, scale = quantize_per_channel_int8(weight)
        has_bias = bias is not None
        bias = bias.detach().float().clone() if has_bias else torch.zeros(weight.shape[0])
        return cls(q.t().contiguous(), scale, bias, has_bias, per_token)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        op = dynamic_int8_linear_per_token if self.per_token else dynamic_int8_linear
        return op(x, self.weight_t, self.weight_scale, self.bias)

    def logical_params(self) -> int:
        """Weights and bias as an ``nn.Linear`` counts them."""
        return self.in_features * self.out_features + (self.out_features if self.has_bias else 0)

    def extra_repr(self) -> str:
        acts = "per token" if self.per_token else "per tensor"
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 dynamic ({acts})"
