"""Weight-only int4/int8 matmul with the operands swapped, ``out.T = W @ x.T``: a few dozen rows to a prefill.

The tensor cores' left operand is 64 rows tall (Hopper's wgmma), and it is the one they may
read from registers. Here it is the weight: a ``(BLOCK_N, BLOCK_K)`` tile unpacked in registers
from the row layout (:func:`weight_only.prepare`: bytes along K, low nibble first, as ONNX
Runtime's ``MatMulNBits`` stores them), so no dequantized tile goes through shared memory, and
the batch is the right operand, ``BLOCK_M`` of 16 columns and up: no tensor-core rows are wasted
on a batch smaller than 64.

int4 splits each byte into the even and the odd rows of K and multiplies them by the even and
the odd columns of ``x`` (two products, no interleave), or, UNPACK, interleaves the nibbles back
into K order for one product against ``x`` as it lies (contiguous loads: what the prefill tiles,
``BLOCK_M`` 128 to 256 from ``PREFILL_ROWS`` rows, take). With 16-bit activations and BIASED, a
code enters as the float ``BIAS + c`` (an AND and an OR: 128 + c is exact in bf16, 1024 + c in
fp16) and ``(BIAS + zero) * sum(x)`` comes off the product; otherwise ``c - zero`` is converted.
The block scale multiplies each tile's product once (``BLOCK_K`` divides the block). Split-K
programs add into the zeroed output, as the other kernels do.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from presso.runtime.triton import tuning

_BIAS = {torch.bfloat16: (0x4300, 128.0), torch.float16: (0x6400, 1024.0)}


def _configs() -> list[triton.Config]:
    # (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, warps, stages): a few dozen rows, with both int4 unpackings
    small = [(16, 64, 128, 4, 4, 3), (16, 128, 128, 4, 4, 3), (16, 128, 64, 8, 4, 4), (16, 64, 64, 8, 4, 4),
             (16, 128, 128, 2, 8, 3), (16, 256, 64, 2, 8, 3), (32, 128, 128, 2, 4, 3), (32, 64, 128, 4, 4, 3),
             (64, 128, 128, 1, 4, 3), (64, 128, 64, 2, 4, 4), (64, 64, 128, 4, 4, 3), (64, 256, 64, 1, 8, 3),
             (64, 128, 128, 2, 8, 3), (32, 128, 64, 4, 4, 4)]
    # prefill: two warpgroups of 64 weight rows each against 128 to 256 batch columns, unpacked in K order
    large = [(128, 128, 64, 1, 8, 3), (256, 128, 64, 1, 8, 3), (128, 256, 64, 1, 8, 3), (128, 128, 128, 1, 8, 3),
             (256, 128, 64, 1, 8, 4)]
    rows = [(r, unpack) for r in small for unpack in (0, 1)] + [(r, 1) for r in large]
    out = [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, BIASED=biased, UNPACK=unpack),
                         num_warps=w, num_stages=st, pre_hook=tuning.zero_output if sk > 1 else None)
           for (bm, bn, bk, sk, w, st), unpack in rows for biased in (0, 1)]
    return tuning.merged(out, tuning.tuned_configs("gemm_swapped"))


PREFILL_ROWS = 128  # from this many rows, the large tiles only


def _prune(configs, named_args, **kwargs):
    """Tiles inside one block; BIASED and UNPACK for int4 only (BIASED with 16-bit x); the batch's
    tile no wider than the batch, 128 columns and more from PREFILL_ROWS rows."""
    args = {**named_args, **kwargs}
    m, group, int4 = args["M"], args["GROUP"], args["BITS"] == 4
    biased_ok = int4 and args["x_ptr"].dtype in _BIAS

    def fits(c) -> bool:
        bm = c.kwargs["BLOCK_M"]
        rows_ok = bm >= PREFILL_ROWS if m >= PREFILL_ROWS else bm <= max(16, triton.next_power_of_2(m))
        return (rows_ok and group % c.kwargs["BLOCK_K"] == 0 and (biased_ok or not c.kwargs["BIASED"])
                and (int4 or not c.kwargs["UNPACK"]))

    kept = [c for c in configs if fits(c)]
    return kept or [triton.Config(dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=min(group, 64), SPLIT_K=1, BIASED=0,
                                       UNPACK=0), num_warps=4, num_stages=3)]


@triton.jit
def _codes(nibbles, zero, MAGIC: tl.constexpr, dtype: tl.constexpr, BIASED: tl.constexpr):
    """Codes as floats in ``dtype``: ``BIAS + c`` (bit pattern ``MAGIC | c``) if BIASED, else ``c - zero``."""
    if BIASED:
        return (nibbles.to(tl.int16) | MAGIC).to(dtype, bitcast=True)
    return (nibbles.to(tl.float32) - zero).to(dtype)


@triton.autotune(configs=_configs(), key=["ROWS", "N", "K", "GROUP", "BITS", "GATED"],
                 prune_configs_by={"early_config_prune": _prune}, do_bench=tuning.bench_in_graph)
@triton.jit
def _gemm_swapped_kernel(x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, M, N, K, BLOCKS, stride_xm, stride_om, ROWS,
                         BIAS, BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
                         HAS_BIAS: tl.constexpr, GATED: tl.constexpr, MAGIC: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, BIASED: tl.constexpr,
                         UNPACK: tl.constexpr):
    row_bytes = BLOCKS * GROUP * BITS // 8
    tiles = tl.cdiv(BLOCKS * GROUP, BLOCK_K)
    rm, rn, mask_m, mask_n, pid_k, first, last = tuning.program_tiles(M, N, tiles, BLOCK_M, BLOCK_N, SPLIT_K)
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for t in range(first, last):
        block = (t * BLOCK_K) // GROUP
        scale = tl.load(s_ptr + rn * BLOCKS + block, mask=mask_n, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zero = tl.load(z_ptr + rn * BLOCKS + block, mask=mask_n, other=0).to(tl.float32)[:, None]
        else:
            zero = 1 << (BITS - 1)
        if BITS == 4:
            rb = t * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
            packed = tl.load(w_ptr + rn[:, None] * row_bytes + rb[None, :], mask=mask_n[:, None], other=0)
            if UNPACK:  # the tile in K order (nibbles interleaved): one product, x loaded as it lies
                rk = t * BLOCK_K + tl.arange(0, BLOCK_K)
                xt = tuning.load_x(x_ptr, rm[None, :] * stride_xm, rk[:, None], mask_m[None, :] & (rk < K)[:, None],
                                   K, GATED)
                part = tl.dot(_codes(tl.interleave(packed & 0xF, packed >> 4), zero, MAGIC, dtype, BIASED), xt)
                x_sum = tl.sum(xt.to(tl.float32), axis=0)
            else:  # even and odd K apart: two products, no interleave
                k_even = 2 * rb[:, None]
                x_even = tuning.load_x(x_ptr, rm[None, :] * stride_xm, k_even, mask_m[None, :] & (k_even < K), K,
                                       GATED)
                x_odd = tuning.load_x(x_ptr, rm[None, :] * stride_xm, k_even + 1,
                                      mask_m[None, :] & (k_even + 1 < K), K, GATED)
                part = tl.dot(_codes(packed & 0xF, zero, MAGIC, dtype, BIASED), x_even)
                part = tl.dot(_codes(packed >> 4, zero, MAGIC, dtype, BIASED), x_odd, part)
                x_sum = tl.sum(x_even.to(tl.float32), axis=0) + tl.sum(x_odd.to(tl.float32), axis=0)
            if BIASED:
                part -= (BIAS + zero) * x_sum[None, :]
        else:
            rk = t * BLOCK_K + tl.arange(0, BLOCK_K)
            codes = tl.load(w_ptr + rn[:, None] * row_bytes + rk[None, :], mask=mask_n[:, None], other=0)
            xt = tuning.load_x(x_ptr, rm[None, :] * stride_xm, rk[:, None], mask_m[None, :] & (rk < K)[:, None],
                               K, GATED)
            part = tl.dot(_codes(codes, zero, MAGIC, dtype, False), xt)
        acc += part * scale[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=mask_n & (pid_k == 0), other=0.0).to(tl.float32)[:, None]
    out = out_ptr + rm[None, :] * stride_om + rn[:, None]
    mask = mask_m[None, :] & mask_n[:, None]
    if SPLIT_K == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out, acc.to(out_ptr.dtype.element_ty), mask=mask, sem="relaxed")


def gemm_swapped(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, k: int,
                 bits: int, bias: torch.Tensor | None = None, config: dict | None = None,
                 gated: bool = False) -> torch.Tensor:
    """``x (..., k) @ W.T`` from :func:`weight_only.prepare`'s operands (scales in ``x``'s dtype);
    ``gated``: ``x`` is ``[gate | up]`` (..., 2k) and the product is ``(silu(gate) * up) @ W.T``."""
    n, blocks = scales.shape
    group = codes.shape[1] * 8 // bits // blocks
    x2 = tuning.as_rows(x, (1 + gated) * k)
    m = x2.shape[0]
    magic, bias_value = _BIAS.get(x.dtype, (0, 0.0))
    if config is not None and config.get("BIASED") and (bits != 4 or not magic):
        raise ValueError("BIASED=1 (codes as BIAS + c) is for int4 with 16-bit activations only")
    out, kernel, config = tuning.tiled_launch(_gemm_swapped_kernel, x, m, n, config, tuning.SMALL_TILES)
    grid = tuning.tile_grid(m, n)
    kernel[grid](x2, codes, scales, zeros if zeros is not None else codes, bias if bias is not None else scales,
                 out, m, n, k, blocks, x2.stride(0), out.stride(0), tuning.rows_key(m), bias_value,
                 BITS=bits, GROUP=group, HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None, GATED=gated,
                 MAGIC=magic, **({} if config is None else {"num_warps": 4, "BIASED": 0, "UNPACK": 0} | config))
    return out.reshape(*x.shape[:-1], n)
