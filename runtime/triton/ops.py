"""The Triton matmuls as torch custom ops (``torch.ops.presso.*``).

``torch.compile`` treats a custom op as one opaque call with a known output shape (its fake
implementation), so a model whose linears run these kernels compiles without a graph break
at every linear, and the elementwise work between them (norms, rotary, SiLU) can fuse. The
``*_add_norm_linear`` ops also take a pre-norm block's residual add and RMS norm in
(:mod:`.prenorm`) and return the sum, the next residual, beside the product.
"""
from __future__ import annotations

import torch

from presso.runtime.triton import w8a8, weight_only


@torch.library.custom_op("presso::weight_only_linear", mutates_args=())
def weight_only_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                       k: int, bits: int, bias: torch.Tensor | None, words: torch.Tensor | None,
                       scales_t: torch.Tensor | None, zeros_t: torch.Tensor | None,
                       gated: bool = False, norm_weight: torch.Tensor | None = None, eps: float = 1e-6
                       ) -> torch.Tensor:
    packed_words = None if words is None else (words, scales_t, zeros_t)
    return weight_only.weight_only_matmul(x, codes, scales, zeros, k, bits, bias, words=packed_words, gated=gated,
                                          norm_weight=norm_weight, eps=eps)


@weight_only_linear.register_fake
def _(x, codes, scales, zeros, k, bits, bias, words, scales_t, zeros_t, gated=False, norm_weight=None, eps=1e-6):
    return x.new_empty(*x.shape[:-1], scales.shape[0])


@torch.library.custom_op("presso::weight_only_add_norm_linear", mutates_args=())
def weight_only_add_norm_linear(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                                codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, k: int,
                                bits: int, bias: torch.Tensor | None, words: torch.Tensor | None,
                                scales_t: torch.Tensor | None, zeros_t: torch.Tensor | None
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    packed_words = None if words is None else (words, scales_t, zeros_t)
    y, h = weight_only.weight_only_matmul(x, codes, scales, zeros, k, bits, bias, words=packed_words,
                                          norm_weight=norm_weight, eps=eps, residual=residual)
    return y, h


@weight_only_add_norm_linear.register_fake
def _(x, residual, norm_weight, eps, codes, scales, zeros, k, bits, bias, words, scales_t, zeros_t):
    return x.new_empty(*x.shape[:-1], scales.shape[0]), torch.empty_like(x)


@torch.library.custom_op("presso::w8a8_linear", mutates_args=())
def w8a8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                gated: bool = False, norm_weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    return w8a8.w8a8_matmul(x, weight, weight_scale, bias, gated=gated, norm_weight=norm_weight, eps=eps)


@w8a8_linear.register_fake
def _(x, weight, weight_scale, bias, gated=False, norm_weight=None, eps=1e-6):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("presso::w8a8_add_norm_linear", mutates_args=())
def w8a8_add_norm_linear(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                         weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    y, h = w8a8.w8a8_matmul(x, weight, weight_scale, bias, norm_weight=norm_weight, eps=eps, residual=residual)
    return y, h


@w8a8_add_norm_linear.register_fake
def _(x, residual, norm_weight, eps, weight, weight_scale, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0]), torch.empty_like(x)
