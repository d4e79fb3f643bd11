"""RMSNorm after a residual add: ``SkipSimplifiedLayerNormalization`` (ONNX Runtime's fused
kernel: one node where the exporter writes eight). The one norm without a residual (the first
block's) stays in standard ONNX: ONNX Runtime's ``SimplifiedLayerNormalization`` sits in the
standard domain, where ``onnx.checker`` refuses it."""
from __future__ import annotations

import torch
from onnxscript import FLOAT
from onnxscript import opset18 as op

from presso.runtime.contrib import contrib_op

_SKIP_RMS = contrib_op("SkipSimplifiedLayerNormalization", ["input:T", "skip:T", "gamma:T"],
                       ["output:T", "mean:T?", "inv_std_var:T?", "input_skip_bias_sum:T?"], {"T": "float"},
                       {"epsilon": "float"})


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


@torch.library.custom_op("presso::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / rms(x) * weight`` over the last dimension."""
    return _rms(x, weight, eps)


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


@torch.library.custom_op("presso::skip_rms_norm", mutates_args=())
def skip_rms_norm(x: torch.Tensor, skip: torch.Tensor, weight: torch.Tensor, eps: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + skip), x + skip)``: the residual stream's next value and its norm."""
    total = x + skip
    return _rms(total, weight, eps), total


@skip_rms_norm.register_fake
def _(x, skip, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


def rms_norm_onnx(x: FLOAT, weight: FLOAT, eps: float = 1e-6) -> FLOAT:
    mean_square = op.ReduceMean(op.Mul(x, x), op.Constant(value_ints=[-1]), keepdims=1)
    return op.Mul(op.Div(x, op.Sqrt(op.Add(mean_square, op.Constant(value_float=eps)))), weight)


def skip_rms_norm_onnx(x: FLOAT, skip: FLOAT, weight: FLOAT, eps: float = 1e-6):
    out, _mean, _inv_std, total = _SKIP_RMS(x, skip, weight, epsilon=eps)
    return out, total
