"""Weight-only quantized linear and embedding: packed 4/8-bit codes, group-wise scales.

The linear lowers to ONNX Runtime's ``com.microsoft::MatMulNBits``; the embedding to its
``GatherBlockQuantized`` on the same packed bytes, so a tied embedding and lm_head read one
packed table. The torch reference rounds the activations to int8 per block,
dequantizes the weight and runs a float matmul: what ``MatMulNBits`` computes at
``accuracy_level=4``.
"""
from __future__ import annotations

import onnx
import torch
from onnxscript import FLOAT, INT64
from onnxscript import opset18 as op
from torch import nn

from presso.runtime.contrib import contrib_op
from presso.runtime.quant import QuantizedWeight, WeightFormat, pack_codes, quantize_weight, scale_codes, unpack_codes

_MATMUL_NBITS = contrib_op("MatMulNBits", ["A:T1", "B:T2", "scales:T1", "zero_points:T2?"], ["Y:T1"],
                           {"T1": "float", "T2": "uint8"},
                           dict.fromkeys(("K", "N", "bits", "block_size", "accuracy_level"), "int"))
_GATHER_BLOCK_QUANTIZED = contrib_op(
    "GatherBlockQuantized", ["data:T1", "indices:Tind", "scales:T2", "zero_points:T1?"], ["output:T2"],
    {"T1": "uint8", "T2": "float", "Tind": "int64"},
    dict.fromkeys(("bits", "block_size", "gather_axis", "quantize_axis"), "int"))


def dequantize_packed(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                      k: int, bits: int) -> torch.Tensor:
    """``(rows, blocks, blob)`` packed codes to a float ``(rows, k)`` weight."""
    rows, blocks, _ = packed.shape
    block = packed.shape[2] * 8 // bits
    codes = unpack_codes(packed, bits, block).float()
    zero = (unpack_codes(zeros, bits, blocks).float() if zeros is not None
            else torch.full((rows, blocks), 2.0 ** (bits - 1), device=packed.device))
    w = (codes - zero[..., None]) * scales.float()[..., None]
    return w.reshape(rows, -1)[:, :k]


@torch.library.custom_op("presso::matmul_nbits", mutates_args=())
def matmul_nbits(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 k: int, n: int, bits: int, block_size: int) -> torch.Tensor:
    """``x @ W.T`` for the packed weight ``W`` ``(n, k)``.

    The weights run with int8 activations, as ONNX Runtime's fast CPU kernels do
    (``accuracy_level=4``): ``x`` is rounded per block of ``block_size`` along k to int8 with
    its own scale. (Their float path, ``accuracy_level=0``, is over 100x slower at batch 1 for
    8-bit weights, and decodes SmolLM2 about 25% slower for 4-bit.)
    """
    x32 = _round_blocks_int8(x.float(), block_size)  # float32 arithmetic whatever the model's dtype
    return torch.matmul(x32, dequantize_packed(packed, scales, zeros, k, bits).t()).to(x.dtype)


def _round_blocks_int8(x: torch.Tensor, block: int) -> torch.Tensor:
    k = x.shape[-1]
    padded = torch.nn.functional.pad(x, (0, -k % block)).unflatten(-1, (-1, block))
    scale = padded.abs().amax(-1, keepdim=True) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (torch.round(padded / scale) * scale).flatten(-2)[..., :k]


def accuracy_level(bits: int) -> int:
    """4: int8 activations (the fast CPU path for 4- and 8-bit weights; 0 would be float)."""
    return 4


@matmul_nbits.register_fake
def _(x, packed, scales, zeros, k, n, bits, block_size):
    return x.new_empty((*x.shape[:-1], n))


@torch.library.custom_op("presso::gather_nbits", mutates_args=())
def gather_nbits(ids: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 k: int, bits: int, block_size: int) -> torch.Tensor:
    """Rows ``ids`` of the packed table, dequantized: an embedding lookup."""
    flat = ids.reshape(-1)
    rows = dequantize_packed(packed[flat], scales[flat], None if zeros is None else zeros[flat], k, bits)
    return rows.reshape(*ids.shape, k)


@gather_nbits.register_fake
def _(ids, packed, scales, zeros, k, bits, block_size):
    return torch.empty((*ids.shape, k), dtype=torch.float32, device=ids.device)


def matmul_nbits_onnx(x: FLOAT, packed, scales, zeros=None, k: int = 0, n: int = 0, bits: int = 4,
                      block_size: int = 32) -> FLOAT:
    # float16 scales are stored as such; ONNX Runtime folds the cast of the constant at load. The
    # kernel takes scales (n, blocks) and zero points (n, packed blocks) as they are stored.
    scales = op.Cast(scales, to=onnx.TensorProto.FLOAT)
    if zeros is None:
        return _MATMUL_NBITS(x, packed, scales, K=k, N=n, bits=bits, block_size=block_size,
                             accuracy_level=accuracy_level(bits))
    return _MATMUL_NBITS(x, packed, scales, zeros, K=k, N=n, bits=bits, block_size=block_size,
                         accuracy_level=accuracy_level(bits))


def _unpack_onnx(packed, bits: int):
    """uint8 bytes ``(..., m)`` to codes ``(..., m * 8 / bits)``, as float."""
    if bits == 8:
        return op.Cast(packed, to=1)
    low = op.BitwiseAnd(packed, op.Constant(value=_u8(0x0F)))
    high = op.BitShift(packed, op.Constant(value=_u8(4)), direction="RIGHT")
    both = op.Concat(op.Unsqueeze(low, op.Constant(value_ints=[-1])),
                     op.Unsqueeze(high, op.Constant(value_ints=[-1])), axis=-1)
    shape = op.Concat(op.Shape(packed, end=-1), op.Constant(value_ints=[-1]), axis=0)
    return op.Cast(op.Reshape(both, shape), to=1)


def _u8(value: int):
    return onnx.helper.make_tensor("u8", onnx.TensorProto.UINT8, [], [value])


def gather_nbits_onnx(ids: INT64, packed, scales, zeros=None, k: int = 0, bits: int = 4,
                      block_size: int = 32) -> FLOAT:
    """``GatherBlockQuantized`` on the packed table as it is stored (``(n, blocks, blob)``, the
    bytes a tied lm_head's ``MatMulNBits`` reads too): one node where unpacking takes twenty.
    Its zero points must be shaped like the table, which 4-bit zero points packed two to a byte
    are not: those tables unpack in standard ONNX."""
    if zeros is not None and bits == 4:
        return _gather_unpacked_onnx(ids, packed, scales, zeros, k, bits)
    last = op.Constant(value_ints=[-1])
    block_scales = op.Unsqueeze(op.Cast(scales, to=onnx.TensorProto.FLOAT), last)  # a scale per (row, block)
    inputs = [packed, ids, block_scales] + ([] if zeros is None else [op.Unsqueeze(zeros, last)])
    rows = _GATHER_BLOCK_QUANTIZED(*inputs, bits=bits, block_size=block_size, gather_axis=0, quantize_axis=2)
    rows = op.Reshape(rows, op.Concat(op.Shape(ids), last, axis=0))  # (*ids, blocks, block) -> (*ids, blocks * block)
    if k % block_size:
        rows = op.Slice(rows, op.Constant(value_ints=[0]), op.Constant(value_ints=[k]), last)
    return rows


def _gather_unpacked_onnx(ids, packed, scales, zeros, k: int, bits: int):
    flat = op.Reshape(ids, op.Constant(value_ints=[-1]))
    codes = _unpack_onnx(op.Gather(packed, flat, axis=0), bits)  # (T, blocks, block)
    row_scales = op.Unsqueeze(op.Cast(op.Gather(scales, flat, axis=0), to=onnx.TensorProto.FLOAT),
                              op.Constant(value_ints=[-1]))
    zero = op.Slice(_unpack_onnx(op.Gather(zeros, flat, axis=0), bits), op.Constant(value_ints=[0]),
                    op.Shape(scales, start=1, end=2), op.Constant(value_ints=[1]))
    zero = op.Unsqueeze(zero, op.Constant(value_ints=[-1]))
    rows = op.Reshape(op.Mul(op.Sub(codes, zero), row_scales), op.Constant(value_ints=[0, -1]))
    rows = op.Slice(rows, op.Constant(value_ints=[0]), op.Constant(value_ints=[k]), op.Constant(value_ints=[1]))
    shape = op.Concat(op.Shape(ids), op.Constant(value_ints=[k]), axis=0)
    return op.Reshape(rows, shape)


class PackedWeight(nn.Module):
    """Buffers of one packed weight: codes ``(N, blocks, blob)``, scales, zero points or None."""

    keeps_format = True  # its float16 scales are a storage format: lowered as they are

    def __init__(self, q: QuantizedWeight):
        super().__init__()
        self.fmt, self.in_features = q.fmt, q.in_features
        self.out_features, blocks = q.scales.shape
        self.block_size = q.block_size
        self.register_buffer("packed", pack_codes(q.codes, q.fmt.bits).view(self.out_features, blocks, -1))
        if q.fmt.scale_bits == 8:  # int8 codes and a float16 scale per row, decoded on use
            codes, rows = scale_codes(q.scales)
            self.register_buffer("scale_codes", codes.contiguous())
            self.register_buffer("row_scales", rows.contiguous())
            self.scales = None
        else:
            dtype = torch.float16 if q.fmt.scale_bits == 16 else torch.float32
            self.register_buffer("scales", q.scales.to(dtype).contiguous())
        zeros = None if q.fmt.symmetric else pack_codes(q.zeros, q.fmt.bits)
        self.register_buffer("zeros", zeros)

    def group_scales(self) -> torch.Tensor:
        """Scales ``(N, blocks)``; with int8 scale codes a product of two constants (folded at load)."""
        if self.scales is None:
            return self.scale_codes.to(torch.float32) * self.row_scales.to(torch.float32)
        return self.scales

    def dequantize(self) -> torch.Tensor:
        return dequantize_packed(self.packed, self.group_scales(), self.zeros, self.in_features, self.fmt.bits)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())


class WeightOnlyLinear(nn.Module):
    """Drop-in for ``nn.Linear`` with a packed weight (possibly shared with an embedding)."""

    def __init__(self, weight: PackedWeight, bias: torch.Tensor | None, tied: bool = False):
        super().__init__()
        self.weight_q = weight
        self.tied = tied  # the packed weight belongs to an embedding and is counted there
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None, fmt: WeightFormat) -> WeightOnlyLinear:
        return cls(PackedWeight(quantize_weight(weight, fmt)), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_q
        y = matmul_nbits(x, w.packed, w.group_scales(), w.zeros, w.in_features, w.out_features, w.fmt.bits,
                         w.block_size)
        return y if self.bias is None else y + self.bias

    def logical_params(self) -> int:
        weights = 0 if self.tied else self.in_features * self.out_features
        return weights + (0 if self.bias is None else self.out_features)

    def extra_repr(self) -> str:
        f = self.weight_q.fmt
        group = "per channel" if f.group_size < 0 else f"group {f.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, int{f.bits} "
                f"{'symmetric' if f.symmetric else 'asymmetric'}, {group}")


class WeightOnlyEmbedding(nn.Module):
    """Drop-in for ``nn.Embedding`` over a packed table."""

    def __init__(self, table: PackedWeight, padding_idx: int | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.weight_q = table
        self.out_dtype = dtype  # the table's float dtype: what the layers after it read
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features
        self.padding_idx = padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = self.weight_q
        rows = gather_nbits(ids, t.packed, t.group_scales(), t.zeros, t.in_features, t.fmt.bits, t.block_size)
        return rows if self.out_dtype == torch.float32 else rows.to(self.out_dtype)

    def logical_params(self) -> int:
        return self.num_embeddings * self.embedding_dim

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int{self.weight_q.fmt.bits}"
