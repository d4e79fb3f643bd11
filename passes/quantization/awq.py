"""AWQ (Lin et al., 2023): activation-aware weight quantization.

1. Scale search: input channels that carry large activations matter most, so their weight
   columns are scaled up by ``s = mean|x| ** alpha`` before rounding (finer relative steps)
   and the inverse scale is folded into the producer of those inputs (see
   :mod:`presso.passes.common.scale_groups`); ``alpha`` is searched per group of linears.
2. Clip search: each group's range is shrunk by the ratio that minimises the output error.

Errors are measured on the calibration data through the input second moment
``H = mean(x x^T)``: the output error of a weight error ``E`` is ``trace(E H E^T)``, exact
for the calibration set and independent of its size.
"""
from __future__ import annotations

import torch

from presso.runtime.quant import (
    QuantizedWeight,
    WeightFormat,
    fake_quantize,
    group_params,
    pad_to_blocks,
    quantize_weight,
)

ALPHAS = torch.linspace(0.0, 1.0, 21)
CLIP_RATIOS = torch.linspace(1.0, 0.5, 11)


def output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    e = weight - approx
    return float(((e @ hessian) * e).sum())


def rtn(weight: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    return quantize_weight(weight, fmt).dequantize()


@torch.no_grad()
def search_scales(weights: list[torch.Tensor], hessian: torch.Tensor, mean_abs: torch.Tensor,
                  fmt: WeightFormat) -> tuple[torch.Tensor, float]:
    """Per-input-channel scales for linears sharing one input; also the best alpha."""
    best = (float("inf"), torch.ones_like(mean_abs), 0.0)
    x = mean_abs.clamp(min=1e-6)
    for alpha in ALPHAS.tolist():
        s = x ** alpha
        s = s / (s.max() * s.min()).sqrt()
        err = sum(output_error(w, rtn(w * s, fmt) / s, hessian) for w in weights)
        if err < best[0]:
            best = (err, s, alpha)
    return best[1], best[2]


@torch.no_grad()
def clip_quantize(weight: torch.Tensor, hessian: torch.Tensor, fmt: WeightFormat) -> QuantizedWeight:
    """Group-wise range clipping chosen per (row, group) by the block-diagonal output error."""
    n, k = weight.shape
    group = fmt.group(k)
    w = pad_to_blocks(weight.float(), group).view(n, -1, group)
    kp = w.shape[1] * group
    hp = torch.zeros(kp, kp, device=hessian.device)
    hp[:k, :k] = hessian
    blocks = torch.stack([hp[i:i + group, i:i + group] for i in range(0, kp, group)])  # (G, g, g)
    best_err = torch.full(w.shape[:2], float("inf"), device=w.device)
    best_scale, best_zero = group_params(w, fmt)
    for ratio in CLIP_RATIOS.tolist():
        scale, zero = group_params(_clipped(w, ratio, fmt), fmt)
        e = w - fake_quantize(w, scale[..., None], zero[..., None], fmt.levels)
        err = (torch.bmm(e.transpose(0, 1), blocks) * e.transpose(0, 1)).sum(-1).t()  # e_g H_g e_g^T
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return quantize_weight(weight, fmt, best_scale, best_zero)


def _clipped(w: torch.Tensor, ratio: float, fmt: WeightFormat) -> torch.Tensor:
    """Values whose group statistics give the range shrunk by ``ratio``."""
    if fmt.symmetric:
        return w * ratio
    lo, hi = w.amin(-1, keepdim=True) * ratio, w.amax(-1, keepdim=True) * ratio
    return torch.cat([lo, hi], dim=-1)
