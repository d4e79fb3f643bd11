"""Modules that run presso's quantized linears through the Triton kernels, and the swap that installs them."""
from __future__ import annotations

import torch
from torch import nn

from presso.graph import replace_module
from presso.runtime.int8 import DynamicInt8Linear
from presso.runtime.nbits import WeightOnlyLinear
from presso.runtime.triton import ops, weight_only
from presso.runtime.triton.gemv_words import prepare_words


class _CastCache:
    """Float operands cast to the activation dtype once per dtype (scales, bias)."""

    def __init__(self):
        self._cast: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def cast(self, name: str, t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        if t is None or t.dtype == dtype:
            return t
        key = (name, dtype)
        if key not in self._cast or self._cast[key].device != t.device:
            self._cast[key] = t.to(dtype).contiguous()
        return self._cast[key]


class TritonWeightOnlyLinear(nn.Module):
    """:class:`WeightOnlyLinear` (int4/int8 codes, group scales) through :func:`weight_only.weight_only_matmul`."""

    def __init__(self, source: WeightOnlyLinear):
        super().__init__()
        w = source.weight_q
        self.in_features, self.out_features, self.bits = w.in_features, w.out_features, w.fmt.bits
        codes, scales, zeros = weight_only.prepare(w.packed, w.group_scales(), w.zeros, w.fmt.bits, torch.float32)
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        # the autotuned kernels read a word-transposed copy (twice the code memory): on an H100 it was
        # 1.2x faster than the row layout at batch 1 for int4 and 1.12x for int8, and 2.2x
        # to 8x faster at 4 to 64 rows (tensor cores, gemm_words; 4096x4096)
        aligned = codes.reshape(codes.shape[0], -1).shape[1] % 4 == 0  # whole 32-bit words per row
        words, scales_t, zeros_t = prepare_words(codes, scales, zeros) if aligned else (None, None, None)
        self.register_buffer("words", words)
        self.register_buffer("scales_t", scales_t)
        self.register_buffer("zeros_t", zeros_t)
        self.register_buffer("bias", None if source.bias is None else source.bias.clone())
        self._casts = _CastCache()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scales = self._casts.cast("scales", self.scales, x.dtype)
        bias = self._casts.cast("bias", self.bias, x.dtype)
        scales_t = self._casts.cast("scales_t", self.scales_t, x.dtype)
        return ops.weight_only_linear(x, self.codes, scales, self.zeros, self.in_features, self.bits, bias,
                                      self.words, scales_t, self.zeros_t)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits} weight-only (Triton)"


class TritonW8A8Linear(nn.Module):
    """:class:`DynamicInt8Linear` (per-token mode) through :func:`w8a8.w8a8_matmul`."""

    def __init__(self, source: DynamicInt8Linear):
        super().__init__()
        self.in_features, self.out_features = source.in_features, source.out_features
        self.register_buffer("weight", source.weight_t.t().contiguous())  # (N, K): K-major for int8 MMA
        self.register_buffer("weight_scale", source.weight_scale.float().contiguous())
        self.register_buffer("bias", source.bias.clone() if source.has_bias else None)
        self._casts = _CastCache()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.w8a8_linear(x, self.weight, self.weight_scale, self._casts.cast("bias", self.bias, x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, W8A8 per-token (Triton)"


def to_triton(root: nn.Module) -> dict[str, str]:
    """Swap every quantized linear that has a Triton kernel, in place; what was swapped, by path."""
    swapped = {}
    for path, module in list(root.named_modules()):  # a shared module is listed (and swapped) once
        if isinstance(module, WeightOnlyLinear):
            new = TritonWeightOnlyLinear(module)
        elif isinstance(module, DynamicInt8Linear) and module.per_token:
            new = TritonW8A8Linear(module)
        else:
            continue
        replace_module(root, path, new)
        swapped[path] = type(new).__name__
    return swapped
