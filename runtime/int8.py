"""Dynamic int8 linear: torch reference ops, the module, and their ONNX lowerings.

Weights are int8, symmetric, per output channel. Activations are quantized at run time,
either per token (a symmetric int8 scale per row: robust to the outlier tokens of LLMs)
or per tensor (asymmetric uint8, ONNX's ``DynamicQuantizeLinear``). The torch ops
reproduce ONNX Runtime's arithmetic (round half to even, exact integer accumulation), so
both backends agree up to float rounding.
"""
from __future__ import annotations

import onnx
import torch
from onnxscript import FLOAT
from onnxscript import opset18 as op
from torch import nn

UINT8_128 = onnx.helper.make_tensor("zero_point_128", onnx.TensorProto.UINT8, [], [128])
_INT32_128 = onnx.helper.make_tensor("int32_128", onnx.TensorProto.INT32, [], [128])
_TINY = 1.1754944e-38  # smallest normal float32


@torch.library.custom_op("presso::dynamic_int8_linear", mutates_args=())
def dynamic_int8_linear(x: torch.Tensor, weight_t: torch.Tensor, weight_scale: torch.Tensor,
                        bias: torch.Tensor) -> torch.Tensor:
    """``x @ dequant(weight_t) + bias`` with ``x`` quantized dynamically to uint8."""
    dtype, x = x.dtype, x.float()
    lo = torch.clamp(x.min(), max=0.0)
    hi = torch.clamp(x.max(), min=0.0)
    scale = (hi - lo) / 255.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero_point = torch.clamp(torch.round(-lo / scale), 0, 255)
    xq = torch.clamp(torch.round(x / scale) + zero_point, 0, 255)
    # integer products below 2**24 per term; float64 accumulation is exact for these sizes
    acc = torch.matmul((xq - zero_point).double(), weight_t.double())
    return ((acc * (scale.double() * weight_scale.double())).float() + bias).to(dtype)


@torch.library.custom_op("presso::dynamic_int8_linear_per_token", mutates_args=())
def dynamic_int8_linear_per_token(x: torch.Tensor, weight_t: torch.Tensor, weight_scale: torch.Tensor,
                                  bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ dequant(weight_t) + bias`` with each row of ``x`` quantized to int8 by its own scale."""
    # |x / scale| <= 127 by construction; the floor keeps an all-zero row at zero
    dtype, x = x.dtype, x.float()
    scale = torch.clamp(x.abs().amax(dim=-1, keepdim=True) / 127.0, min=_TINY)
    xq = torch.round(x / scale)
    acc = torch.matmul(xq.double(), weight_t.double())  # exact: |products| < 2**14, sums < 2**53
    y = (acc.float() * weight_scale) * scale  # float32, in the ONNX lowering's order
    return (y if bias is None else y + bias).to(dtype)


@dynamic_int8_linear.register_fake
@dynamic_int8_linear_per_token.register_fake
def _(x, weight_t, weight_scale, bias):
    return x.new_empty((*x.shape[:-1], weight_t.shape[1]))


def as_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32; a float32 ``x`` as it is, so a float32 model's trace gets no Cast."""
    return x if x.dtype == torch.float32 else x.float()


def same_dtype(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``y`` in ``like``'s dtype: quantized layers compute in float32 and keep the model's dtype."""
    return y if y.dtype == like.dtype else y.to(like.dtype)


def as_uint8(weight_int8):
    """int8 codes as uint8 with zero point 128 (folded into the initializer when the session loads).

    ONNX Runtime's u8 x s8 kernels on AVX2 CPUs without VNNI sum pairs of products in int16
    with saturation (``vpmaddubsw``), which corrupts results at full 8-bit range; its u8 x u8
    kernels widen to int16 first and are exact on every CPU.
    """
    return op.Cast(op.Add(op.Cast(weight_int8, to=6), op.Constant(value=_INT32_128)), to=2)  # 6: INT32, 2: UINT8


def dynamic_int8_linear_onnx(x: FLOAT, weight_t, weight_scale: FLOAT, bias: FLOAT) -> FLOAT:
    """Standard ONNX operators; ONNX Runtime fuses them into an integer matmul kernel."""
    xq, x_scale, x_zero_point = op.DynamicQuantizeLinear(x)
    acc = op.MatMulInteger(xq, as_uint8(weight_t), x_zero_point, op.Constant(value=UINT8_128))
    return op.Add(op.Mul(op.Cast(acc, to=1), op.Mul(x_scale, weight_scale)), bias)


def dynamic_int8_linear_per_token_onnx(x: FLOAT, weight_t, weight_scale: FLOAT, bias=None) -> FLOAT:
    """Per-row symmetric scales; the int8 codes travel as uint8 with zero point 128.

    The arithmetic is exactly the symmetric int8 one, but ``MatMulInteger`` gets the
    uint8 x int8 operand types that ONNX Runtime's fastest CPU kernels take. Few ops:
    at batch 1 their count, not their work, is what costs.
    """
    absmax = op.ReduceMax(op.Abs(x), op.Constant(value_ints=[-1]), keepdims=1)
    scale = op.Max(op.Div(absmax, op.Constant(value_float=127.0)), op.Constant(value_float=_TINY))
    codes = op.Add(op.Round(op.Div(x, scale)), op.Constant(value_float=128.0))
    acc = op.MatMulInteger(op.Cast(codes, to=2), as_uint8(weight_t), op.Constant(value=UINT8_128),
                           op.Constant(value=UINT8_128))  # to=2: UINT8
    # weight scale first: ONNX Runtime fuses MatMulInteger -> Cast -> Mul(a_scale * b_scale) into
    # MatMulIntegerToFloat, whose a_scale cannot be per row; this order keeps the fusion off
    y = op.Mul(op.Mul(op.Cast(acc, to=1), weight_scale), scale)
    return y if bias is None else op.Add(y, bias)


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
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, per_token: bool = True) -> DynamicInt8Linear:
        """``weight`` is (out_features, in_features), as in ``nn.Linear``."""
        q, scale = quantize_per_channel_int8(weight)
        has_bias = bias is not None
        bias = bias.detach().float().clone() if has_bias else torch.zeros(weight.shape[0])
        return cls(q.t().contiguous(), scale, bias, has_bias, per_token)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_token:
            bias = self.bias if self.has_bias else None
            return dynamic_int8_linear_per_token(x, self.weight_t, self.weight_scale, bias)
        return dynamic_int8_linear(x, self.weight_t, self.weight_scale, self.bias)

    def logical_params(self) -> int:
        """Weights and bias as an ``nn.Linear`` counts them."""
        return self.in_features * self.out_features + (self.out_features if self.has_bias else 0)

    def extra_repr(self) -> str:
        acts = "per token" if self.per_token else "per tensor"
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 dynamic ({acts})"
