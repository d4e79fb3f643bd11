"""Modules that run presso's quantized linears through the Triton kernels, and the swap that installs them."""
from __future__ import annotations

import torch
from torch import nn

from presso.graph import replace_module
from presso.runtime.fused.llama import FAMILIES, as_shipped, ships_gated_mlp
from presso.runtime.fused.packing import pack_linears
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

    def forward(self, x: torch.Tensor, gated: bool = False, norm: nn.Module | None = None,
                residual: torch.Tensor | None = None):
        """``gated``: ``x`` is ``[gate | up]`` and the input of the product is ``silu(gate) * up``.
        ``norm``: an RMS norm of ``x + residual`` is the input, and with a ``residual`` the result
        is ``(product, x + residual)``; at batch 1 both run in the kernel's launches (:mod:`.prenorm`)."""
        scales = self._casts.cast("scales", self.scales, x.dtype)
        bias = self._casts.cast("bias", self.bias, x.dtype)
        scales_t = self._casts.cast("scales_t", self.scales_t, x.dtype)
        weights = (self.codes, scales, self.zeros, self.in_features, self.bits, bias, self.words, scales_t,
                   self.zeros_t)
        norm_weight, eps = _norm_operands(norm, residual, x.dtype)
        if residual is not None:
            return ops.weight_only_add_norm_linear(x, residual, norm_weight, eps, *weights)
        return ops.weight_only_linear(x, *weights, gated, norm_weight, eps)

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

    def forward(self, x: torch.Tensor, gated: bool = False, norm: nn.Module | None = None,
                residual: torch.Tensor | None = None):
        """``gated``: ``x`` is ``[gate | up]`` and the input is ``silu(gate) * up``; ``norm``: an RMS
        norm of ``x + residual`` is the input, and with a ``residual`` the result is ``(product,
        x + residual)``. Each runs in the launch that quantizes the activations."""
        norm_weight, eps = _norm_operands(norm, residual, x.dtype)
        bias = self._casts.cast("bias", self.bias, x.dtype)
        if residual is not None:
            return ops.w8a8_add_norm_linear(x, residual, norm_weight, eps, self.weight, self.weight_scale, bias)
        return ops.w8a8_linear(x, self.weight, self.weight_scale, bias, gated, norm_weight, eps)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, W8A8 per-token (Triton)"


def rms_norm_parts(norm: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """The scale vector and epsilon of an RMS norm: ``nn.RMSNorm`` (epsilon None: the dtype's) or a
    transformers one (``variance_epsilon``)."""
    weight = getattr(norm, "weight", None)
    eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", None))
    if weight is None:
        raise TypeError(f"{type(norm).__name__} has no scale vector: only RMS norms with a weight fuse "
                        "into the W8A8 quantization")
    return weight, torch.finfo(dtype).eps if eps is None else float(eps)


def _norm_operands(norm: nn.Module | None, residual: torch.Tensor | None,
                   dtype: torch.dtype) -> tuple[torch.Tensor | None, float]:
    if norm is None:
        if residual is not None:
            raise ValueError("a residual is added only before a norm: pass norm= with residual=")
        return None, 1e-6
    return rms_norm_parts(norm, dtype)


class TritonGatedMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))`` in two launches where it took five: gate and up packed into
    one linear (one read of ``x``), and the down projection gates its input as it loads it (int4
    and int8 weight-only) or as it quantizes it (W8A8): no gated tensor is written."""

    def __init__(self, gate_up: nn.Module, down: nn.Module):
        super().__init__()
        self.gate_up, self.down = gate_up, down
        self.norm: nn.Module | None = None  # the layer's RMS norm, where a W8A8 gate/up takes it in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        both = self.gate_up(x) if self.norm is None else self.gate_up(x, norm=self.norm)
        return self.down(both, gated=True)


def _triton_linear(module: nn.Module) -> nn.Module | None:
    if isinstance(module, WeightOnlyLinear):
        return TritonWeightOnlyLinear(module)
    if isinstance(module, DynamicInt8Linear) and module.per_token:
        return TritonW8A8Linear(module)
    return None


def _gated_mlp(mlp: nn.Module) -> TritonGatedMLP | None:
    """The MLP as two launches, where gate and up pack (same format) and every linear has a kernel."""
    if not ships_gated_mlp(mlp):
        return None
    packed = pack_linears([mlp.gate_proj, mlp.up_proj])
    gate_up = None if packed is None else _triton_linear(packed)
    down = _triton_linear(mlp.down_proj)
    return None if gate_up is None or down is None else TritonGatedMLP(gate_up, down)


def _fold_mlp_norm(layer: nn.Module) -> bool:
    """A W8A8 gated MLP takes its layer's post-attention RMS norm into the launch that quantizes
    its input (one launch fewer a layer), where the layer and the norm run the forward
    transformers ships for a fused family: then the norm's output feeds the MLP alone."""
    mlp, norm = getattr(layer, "mlp", None), getattr(layer, "post_attention_layernorm", None)
    if not (isinstance(mlp, TritonGatedMLP) and isinstance(mlp.gate_up, TritonW8A8Linear) and mlp.norm is None):
        return False
    if not any(as_shipped(layer, family) and as_shipped(norm, family) for family in FAMILIES):
        return False
    mlp.norm, layer.post_attention_layernorm = norm, nn.Identity()
    return True


def to_triton(root: nn.Module) -> dict[str, str]:
    """Swap every quantized linear that has a Triton kernel, in place (a gated MLP whose linears all
    have one as a whole: :class:`TritonGatedMLP`); what was swapped, by path."""
    swapped = {}
    for path, module in list(root.named_modules()):  # a shared module is listed (and swapped) once
        if any(path.startswith(done + ".") for done in swapped):
            continue  # inside an MLP swapped as a whole
        new = _gated_mlp(module) or _triton_linear(module)
        if new is not None:
            replace_module(root, path, new)
            swapped[path] = type(new).__name__
    for path, module in list(root.named_modules()):
        if _fold_mlp_norm(module):
            swapped[f"{path}.post_attention_layernorm"] = "folded into TritonGatedMLP"
    return swapped
