"""Linears that read one tensor, packed into one: q/k/v, and gate/up, as one matmul.

One kernel then reads the input once (and, for int8 activations, quantizes it once) where
three did. Packing is exact for the formats below: each output column depends only on the
input and that column's own weights and scales (``MatMulNBits`` rounds the input to int8 per
block of k, per-token int8 scales are per input row, a static scale is the input's), so the
packed output is the parts' outputs side by side. Only quantized formats are packed: their
copies are small, where concatenating float weights would hold them twice.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

from presso.runtime.int8 import DynamicInt8Linear
from presso.runtime.nbits import WeightOnlyLinear
from presso.runtime.qdq import StaticInt8Linear


def _concat_buffers(parts: Sequence[nn.Module], dims: dict[str, int]) -> nn.Module:
    """A shallow copy of ``parts[0]`` whose buffers in ``dims`` are the parts' concatenated."""
    packed = copy.copy(parts[0])
    packed._buffers, packed._modules = dict(packed._buffers), dict(packed._modules)
    for name, dim in dims.items():
        if packed._buffers.get(name) is not None:
            packed._buffers[name] = torch.cat([p._buffers[name] for p in parts], dim)
    return packed


def _weight_only(parts: Sequence[WeightOnlyLinear]) -> nn.Module | None:
    first = parts[0].weight_q
    if any(p.tied or p.weight_q.fmt != first.fmt or p.weight_q.block_size != first.block_size for p in parts):
        return None
    if any(p.bias is not None for p in parts) and any(p.bias is None for p in parts):
        return None
    weight = _concat_buffers([p.weight_q for p in parts], {"packed": 0, "scales": 0, "scale_codes": 0,
                                                           "row_scales": 0, "zeros": 0})
    weight.out_features = sum(p.out_features for p in parts)
    packed = _concat_buffers(parts, {"bias": 0})
    packed._modules["weight_q"] = weight
    packed.out_features = weight.out_features
    return packed


def _dynamic_int8(parts: Sequence[DynamicInt8Linear]) -> nn.Module | None:
    if len({p.per_token for p in parts}) != 1:
        return None
    packed = _concat_buffers(parts, {"weight_t": 1, "weight_scale": 0, "bias": 0})  # a zero bias where none
    packed.has_bias, packed.out_features = any(p.has_bias for p in parts), sum(p.out_features for p in parts)
    return packed


def _static_int8(parts: Sequence[StaticInt8Linear]) -> nn.Module | None:
    quants = [p.input_quant for p in parts]
    same = all(q.symmetric == quants[0].symmetric and torch.equal(q.scale, quants[0].scale)
               and torch.equal(q.zero_point, quants[0].zero_point) for q in quants)
    if not same or (any(p.bias is None for p in parts) and any(p.bias is not None for p in parts)):
        return None
    packed = _concat_buffers(parts, {"weight_t": 1, "weight_scale": 0, "bias": 0})
    packed.out_features = sum(p.out_features for p in parts)
    return packed


PACKERS: dict[type, Callable[[Sequence[nn.Module]], nn.Module | None]] = {
    WeightOnlyLinear: _weight_only, DynamicInt8Linear: _dynamic_int8, StaticInt8Linear: _static_int8,
}


def pack_linears(parts: Sequence[nn.Module]) -> nn.Module | None:
    """One module whose output is the parts' outputs concatenated, or None where they differ in
    kind, format or input width (they are then called one by one)."""
    kind = type(parts[0])
    packer = PACKERS.get(kind)
    if packer is None or any(type(p) is not kind or p.in_features != parts[0].in_features for p in parts):
        return None
    return packer(parts)

