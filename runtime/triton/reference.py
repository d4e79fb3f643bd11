"""Torch references for the Triton kernels, computed in float64 (CPU or GPU)."""
from __future__ import annotations

import torch

from presso.runtime.nbits import dequantize_packed


def weight_only_reference(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                          k: int, bits: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    w = dequantize_packed(packed.cpu(), scales.cpu().float(), None if zeros is None else zeros.cpu(), k, bits)
    y = x.detach().cpu().double() @ w.double().t()
    return y if bias is None else y + bias.cpu().double()


def w8a8_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """``weight`` int8 ``(N, K)``."""
    x = x.detach().cpu().double().reshape(-1, weight.shape[1])
    peak = x.abs().amax(-1, keepdim=True)
    sx = torch.where(peak > 0, peak / 127, torch.ones_like(peak))
    q = torch.clamp(torch.sign(x / sx) * torch.floor((x / sx).abs() + 0.5), -127, 127)  # half away from zero
    y = (q @ weight.cpu().double().t()) * sx * weight_scale.cpu().double()[None, :]
    return y if bias is None else y + bias.cpu().double()
