"""Weight-only int4/int8 matmul in Triton: ``x @ W.T`` with ``W`` in presso's packed layout.

The weight stays as :class:`~presso.runtime.nbits.PackedWeight` stores it (ONNX Runtime's
``MatMulNBits`` layout): codes ``(N, blocks, block * bits / 8)`` two 4-bit codes per byte,
low nibble first; one scale and zero point per block along K. Only the scales are cast to
the activation dtype (and asymmetric zero points unpacked to one byte each) once.

Dequantization is folded into the matmul: per K-tile (inside one block),
``x @ (c - z)^T * s = (x @ c^T - sum(x) z) * s``, so each weight costs an unpack and a
convert, and the scale is applied once per output, not per weight. Small batches split K
across programs (atomic adds into the zeroed output) so that every multiprocessor streams
weights; the configuration per shape is autotuned.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from presso.runtime.triton import dequant, prenorm, tuning
from presso.runtime.triton.gemm_swapped import gemm_swapped
from presso.runtime.triton.gemm_words import gemm_words
from presso.runtime.triton.gemv_words import gemv_words
from presso.runtime.triton.pins import swapped_rows


def _configs() -> list[triton.Config]:
    out = []
    for block_m, block_n, block_k, split_k, warps, stages in [
        (16, 32, 64, 1, 4, 4), (16, 32, 128, 1, 4, 4), (16, 64, 128, 1, 4, 4), (16, 32, 128, 2, 4, 4),
        (16, 32, 128, 4, 4, 4), (16, 64, 128, 4, 4, 3), (16, 32, 64, 8, 4, 4), (16, 32, 128, 8, 2, 4),
        (16, 64, 64, 8, 4, 4), (16, 16, 128, 1, 2, 5), (16, 16, 128, 4, 2, 5),
        (32, 64, 64, 1, 4, 4), (32, 64, 128, 2, 4, 3), (64, 64, 64, 1, 4, 4), (64, 128, 64, 1, 8, 3),
        (64, 64, 128, 2, 4, 3), (128, 128, 64, 1, 8, 3), (64, 128, 128, 1, 8, 3),
    ]:
        out.append(triton.Config(dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k),
                                 num_warps=warps, num_stages=stages,
                                 pre_hook=tuning.zero_output if split_k > 1 else None))
    return out


def _prune(configs, named_args, **kwargs):
    """Tiles sit inside one quantization block; M <= 16 takes the 16-row tiles, larger M the rest."""
    args = {**named_args, **kwargs}
    m, block = args["M"], args["GROUP"]
    small = m <= 16
    kept = [c for c in configs if block % c.kwargs["BLOCK_K"] == 0 and (c.kwargs["BLOCK_M"] == 16) == small
            and c.kwargs["BLOCK_M"] <= max(32, triton.next_power_of_2(m))]
    return kept or [triton.Config(dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=block, SPLIT_K=1), num_warps=4, num_stages=3)]


@triton.autotune(configs=_configs(), key=["ROWS", "N", "K", "GROUP", "BITS"],
                 prune_configs_by={"early_config_prune": _prune},
                 do_bench=tuning.bench_in_graph)
@triton.jit
def _weight_only_kernel(x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, M, N, K, BLOCKS, stride_xm, stride_om, ROWS,
                        BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    row_bytes = BLOCKS * GROUP * BITS // 8
    tiles = tl.cdiv(BLOCKS * GROUP, BLOCK_K)
    rm, rn, mask_m, mask_n, pid_k, first, last = tuning.program_tiles(M, N, tiles, BLOCK_M, BLOCK_N, SPLIT_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(first, last):
        block = (t * BLOCK_K) // GROUP
        scale = tl.load(s_ptr + rn * BLOCKS + block, mask=mask_n, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zero = tl.load(z_ptr + rn * BLOCKS + block, mask=mask_n, other=0).to(tl.float32)
        else:
            zero = tl.full((BLOCK_N,), 1 << (BITS - 1), tl.float32)
        if BITS == 4:  # even k in the low nibbles, odd k in the high: two half-width products, no interleave
            rb = t * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
            packed = tl.load(w_ptr + rn[:, None] * row_bytes + rb[None, :], mask=mask_n[:, None], other=0)
            mask_x = mask_m[:, None] & (2 * rb < K)[None, :]
            x_even = tl.load(x_ptr + rm[:, None] * stride_xm + 2 * rb[None, :], mask=mask_x, other=0.0)
            mask_x = mask_m[:, None] & (2 * rb + 1 < K)[None, :]
            x_odd = tl.load(x_ptr + rm[:, None] * stride_xm + 2 * rb[None, :] + 1, mask=mask_x, other=0.0)
            part = tl.dot(x_even, tl.trans((packed & 0xF).to(x_even.dtype)))
            part = tl.dot(x_odd, tl.trans((packed >> 4).to(x_odd.dtype)), part)
            x_sum = tl.sum(x_even.to(tl.float32), axis=1) + tl.sum(x_odd.to(tl.float32), axis=1)
        else:
            rk = t * BLOCK_K + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=mask_m[:, None] & (rk < K)[None, :],
                        other=0.0)
            codes = tl.load(w_ptr + rn[:, None] * row_bytes + rk[None, :], mask=mask_n[:, None], other=0)
            part = tl.dot(x, tl.trans(codes.to(x.dtype)))
            x_sum = tl.sum(x.to(tl.float32), axis=1)
        acc += (part - x_sum[:, None] * zero[None, :]) * scale[None, :]
    tuning.store_tile(acc, bias_ptr, out_ptr, rm, rn, mask_m, mask_n, stride_om, pid_k, HAS_BIAS, SPLIT_K)


@triton.jit
def _to_float(codes, MAGIC: tl.constexpr):
    """Unsigned codes (< 2**23) to float32; MAGIC: by OR-ing them into the mantissa of 2**23 (no int-to-float unit)."""
    if MAGIC:
        return (codes.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    return codes.to(tl.float32)


def _gemv_configs() -> list[triton.Config]:
    return tuning.grid(("BLOCK_N", "BLOCK_K", "SPLIT_K"), [
        (16, 128, 1, 2), (32, 128, 1, 4), (64, 64, 1, 4), (16, 128, 4, 2), (32, 128, 2, 4), (32, 128, 4, 4),
        (32, 64, 8, 4), (64, 128, 4, 4), (16, 256, 8, 4), (32, 256, 4, 4), (16, 64, 16, 2), (128, 64, 2, 4)],
        flag="MAGIC")


def _gemv_prune(configs, named_args, **kwargs):
    block = {**named_args, **kwargs}["GROUP"]
    kept = [c for c in configs if block % c.kwargs["BLOCK_K"] == 0]
    return kept or [triton.Config(dict(BLOCK_N=32, BLOCK_K=block, SPLIT_K=1, MAGIC=1), num_warps=4, num_stages=3)]


@triton.autotune(configs=_gemv_configs(), key=["ROWS", "N", "K", "GROUP", "BITS"],
                 prune_configs_by={"early_config_prune": _gemv_prune},
                 do_bench=tuning.bench_in_graph)
@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, M, N, K, BLOCKS, stride_xm, stride_om, ROWS,
                 BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                 MAGIC: tl.constexpr):
    """A few rows of ``x``: multiply-and-reduce on the CUDA cores (no tensor-core layouts to convert to)."""
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = rm < M, rn < N
    row_bytes = BLOCKS * GROUP * BITS // 8
    tiles = tl.cdiv(BLOCKS * GROUP, BLOCK_K)
    per_split = tl.cdiv(tiles, SPLIT_K)
    if BLOCK_M == 1:
        acc = _gemv_row(x_ptr, w_ptr, s_ptr, z_ptr, K, BLOCKS, rn, mask_n, row_bytes, pid_k * per_split,
                        min((pid_k + 1) * per_split, tiles), BITS, GROUP, HAS_ZEROS, BLOCK_N, BLOCK_K, MAGIC)[None, :]
    else:
        acc = _gemv_rows(x_ptr, w_ptr, s_ptr, z_ptr, K, BLOCKS, stride_xm, rm, rn, mask_m, mask_n, row_bytes,
                         pid_k * per_split, min((pid_k + 1) * per_split, tiles), BITS, GROUP, HAS_ZEROS,
                         BLOCK_M, BLOCK_N, BLOCK_K, MAGIC)
    tuning.store_tile(acc, bias_ptr, out_ptr, rm, rn, mask_m, mask_n, stride_om, pid_k, HAS_BIAS, SPLIT_K)


@triton.jit
def _gemv_row(x_ptr, w_ptr, s_ptr, z_ptr, K, BLOCKS, rn, mask_n, row_bytes, start, end, BITS: tl.constexpr,
              GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              MAGIC: tl.constexpr):
    """One row of x: products accumulate per lane and are reduced once, after the loop."""
    acc = tl.zeros((BLOCK_N, BLOCK_K * BITS // 8), dtype=tl.float32)
    for t in range(start, end):
        block = (t * BLOCK_K) // GROUP
        scale = tl.load(s_ptr + rn * BLOCKS + block, mask=mask_n, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zero = tl.load(z_ptr + rn * BLOCKS + block, mask=mask_n, other=0).to(tl.float32)
        else:
            zero = tl.full((BLOCK_N,), 1 << (BITS - 1), tl.float32)
        rb = t * (BLOCK_K * BITS // 8) + tl.arange(0, BLOCK_K * BITS // 8)
        packed = tl.load(w_ptr + rn[:, None] * row_bytes + rb[None, :], mask=mask_n[:, None], other=0)
        if BITS == 4:
            x_even = tl.load(x_ptr + 2 * rb, mask=2 * rb < K, other=0.0).to(tl.float32)
            x_odd = tl.load(x_ptr + 2 * rb + 1, mask=2 * rb + 1 < K, other=0.0).to(tl.float32)
            lo = _to_float(packed & 0xF, MAGIC) - zero[:, None]
            hi = _to_float(packed >> 4, MAGIC) - zero[:, None]
            acc += (x_even[None, :] * lo + x_odd[None, :] * hi) * scale[:, None]
        else:
            x = tl.load(x_ptr + rb, mask=rb < K, other=0.0).to(tl.float32)
            acc += x[None, :] * ((_to_float(packed, MAGIC) - zero[:, None]) * scale[:, None])
    return tl.sum(acc, axis=1)


@triton.jit
def _gemv_rows(x_ptr, w_ptr, s_ptr, z_ptr, K, BLOCKS, stride_xm, rm, rn, mask_m, mask_n, row_bytes, start, end,
               BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MAGIC: tl.constexpr):
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(start, end):
        block = (t * BLOCK_K) // GROUP
        scale = tl.load(s_ptr + rn * BLOCKS + block, mask=mask_n, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zero = tl.load(z_ptr + rn * BLOCKS + block, mask=mask_n, other=0).to(tl.float32)
        else:
            zero = tl.full((BLOCK_N,), 1 << (BITS - 1), tl.float32)
        if BITS == 4:  # even k in the low nibbles, odd k in the high: two half-width products, no interleave
            rb = t * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
            packed = tl.load(w_ptr + rn[:, None] * row_bytes + rb[None, :], mask=mask_n[:, None], other=0)
            mask_x = mask_m[:, None] & (2 * rb < K)[None, :]
            x_even = tl.load(x_ptr + rm[:, None] * stride_xm + 2 * rb[None, :], mask=mask_x, other=0.0)
            mask_x = mask_m[:, None] & (2 * rb + 1 < K)[None, :]
            x_odd = tl.load(x_ptr + rm[:, None] * stride_xm + 2 * rb[None, :] + 1, mask=mask_x, other=0.0)
            x_even, x_odd = x_even.to(tl.float32), x_odd.to(tl.float32)
            part = tl.sum(x_even[:, None, :] * _to_float(packed & 0xF, MAGIC)[None, :, :], axis=2)
            part += tl.sum(x_odd[:, None, :] * _to_float(packed >> 4, MAGIC)[None, :, :], axis=2)
            x_sum = tl.sum(x_even.to(tl.float32), axis=1) + tl.sum(x_odd.to(tl.float32), axis=1)
        else:
            rk = t * BLOCK_K + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=mask_m[:, None] & (rk < K)[None, :],
                        other=0.0)
            codes = tl.load(w_ptr + rn[:, None] * row_bytes + rk[None, :], mask=mask_n[:, None], other=0)
            x = x.to(tl.float32)
            part = tl.sum(x[:, None, :] * _to_float(codes, MAGIC)[None, :, :], axis=2)
            x_sum = tl.sum(x, axis=1)
        acc += (part - x_sum[:, None] * zero[None, :]) * scale[None, :]
    return acc


GEMV_MAX_ROWS = 8  # up to this many rows of x, the CUDA-core kernel; above, tensor cores
# rows, by bits, up to which the swapped-operand kernel takes the word layout's place: none until a
# kernel table measures it ahead (set PRESSO_SWAPPED_ROWS="4:32,8:16" to time a model with it)
SWAPPED_ROWS = swapped_rows(os.environ.get("PRESSO_SWAPPED_ROWS", ""))


def prepare(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Kernel operands from a packed weight: codes as rows of bytes, scales in ``dtype``, zero points unpacked."""
    from presso.runtime.quant import unpack_codes

    n, blocks = scales.shape
    codes = packed.reshape(n, -1).contiguous()
    z = None if zeros is None else unpack_codes(zeros, bits, blocks).contiguous()
    return codes, scales.to(dtype).contiguous(), z


def weight_only_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                       k: int, bits: int, bias: torch.Tensor | None = None,
                       config: dict | None = None, words: tuple | None = None, gated: bool = False,
                       norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
                       residual: torch.Tensor | None = None):
    """``x (..., k) @ W.T`` for ``W (n, k)`` from :func:`prepare`'s operands; output in ``x``'s dtype.

    ``words``: :func:`gemv_words.prepare_words`'s copy of the same weight, which the autotuned
    kernels read when it is given (:mod:`gemv_words` for one row, :mod:`gemm_words` for more,
    :mod:`dequant` and cuBLAS from ``dequant.MIN_ROWS`` rows). ``gated``: ``x`` is ``[gate | up]``
    (..., 2k) and the product is ``(silu(gate) * up) @ W.T``, the gating done as the word
    kernels load ``x`` (one launch, no gated tensor written). ``norm_weight``: the input is
    ``rms_norm(x + residual)``, the add and the norm done in the batch-1 kernel's launches
    (:mod:`prenorm`), in torch for more rows; with a ``residual`` the result is
    ``(product, x + residual)``.
    """
    if norm_weight is not None and not (words is not None and config is None and x.numel() == k):
        x_in, h = prenorm.add_norm(x, residual, norm_weight, eps)
        y = weight_only_matmul(x_in, codes, scales, zeros, k, bits, bias, config, words)
        return y if residual is None else (y, h)
    if gated and (words is None or config is not None):  # the row-layout kernels load x as it is
        x, gated = tuning.silu_gate(x), False
    n, blocks = scales.shape
    group = codes.shape[1] * 8 // bits // blocks
    x2 = tuning.as_rows(x, (1 + gated) * k)
    m = x2.shape[0]
    if words is not None and config is None:  # batch 1 on CUDA cores, more rows on tensor cores
        if m == 1:
            return gemv_words(x, *words, k, bits, bias, gated=gated, norm_weight=norm_weight, eps=eps,
                              residual=residual)
        if m <= SWAPPED_ROWS.get(bits, 0):
            return gemm_swapped(x2, codes, scales, zeros, k, bits, bias, gated=gated).reshape(*x.shape[:-1], n)
        kernel = gemm_words if m < dequant.MIN_ROWS else dequant.dequantize_matmul
        return kernel(x2, *words, k, bits, bias, gated=gated).reshape(*x.shape[:-1], n)
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)

    if config is None and os.environ.get("TRITON_INTERPRET") == "1":  # the CPU interpreter cannot autotune
        config = dict(BLOCK_N=16, BLOCK_K=16, SPLIT_K=1) | ({} if m <= GEMV_MAX_ROWS else dict(BLOCK_M=16))
    if config is not None and config.get("SPLIT_K", 1) > 1:
        out.zero_()
    gemv = m <= GEMV_MAX_ROWS or (bits == 4 and group < 32)  # tensor-core tiles need 16 codes per half
    if config is not None and gemv:
        config = {"MAGIC": 1} | {key: v for key, v in config.items() if key != "BLOCK_M"}
    elif config is not None:
        config = {key: v for key, v in config.items() if key != "MAGIC"}
    tuned = _gemv_kernel if gemv else _weight_only_kernel
    kernel = tuned if config is None else tuned.fn  # .fn: the kernel without autotuning
    extra = dict(BLOCK_M=min(GEMV_MAX_ROWS, triton.next_power_of_2(m))) if gemv else {}

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"], triton.cdiv(m, meta["BLOCK_M"])) if gemv else \
            (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, meta["BLOCK_M"]), meta["SPLIT_K"])

    kernel[grid](x2, codes, scales, zeros if zeros is not None else codes, bias if bias is not None else scales, out,
                 m, n, k, blocks, x2.stride(0), out.stride(0), tuning.rows_key(m), BITS=bits, GROUP=group,
                 HAS_ZEROS=zeros is not None,
                 HAS_BIAS=bias is not None, **extra, **(config or {}))
    return out.reshape(*x.shape[:-1], n)
