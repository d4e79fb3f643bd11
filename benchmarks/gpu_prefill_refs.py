"""Prefill references that ``benchmarks.gpu_sweep`` times beside the kernels: a plain Triton
bf16 GEMM (tiles loaded and multiplied, nothing dequantized: the ceiling of any fused Triton
kernel) and int4 with its operands swapped (``out.T = W @ x.T``, the dequantized weight in the
operand wgmma may read from registers), plain or fed biased codes."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _grouped(pid, grid_a, grid_b, GROUP: tl.constexpr):
    """Program ``pid``'s tile ``(a, b)``: ``GROUP`` tiles along ``a`` run side by side, so the
    operand they share along ``b`` is read from L2 more often than from memory."""
    first = pid // (GROUP * grid_b) * GROUP
    size = min(grid_a - first, GROUP)
    return first + (pid % (GROUP * grid_b)) % size, (pid % (GROUP * grid_b)) // size


@triton.jit
def _bf16_gemm_kernel(x_ptr, w_ptr, out_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """``x (M, K) @ w (K, N)`` in bf16, grouped tile order for L2 reuse: the bound for a fused kernel."""
    pid_m, pid_n = _grouped(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(x_ptr + rm[:, None] * K + (k + rk)[None, :], mask=(rm < M)[:, None], other=0.0)
        b = tl.load(w_ptr + (k + rk)[:, None] * N + rn[None, :], mask=(rn < N)[None, :], other=0.0)
        acc = tl.dot(a, b, acc)
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc.to(tl.bfloat16), mask=(rm < M)[:, None] & (rn < N)[None, :])


def bf16_gemm(x: torch.Tensor, w_t: torch.Tensor, config: dict) -> torch.Tensor:
    m, k = x.shape
    n = w_t.shape[1]
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    cfg = dict(config)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _bf16_gemm_kernel[grid](x, w_t, out, m, n, k, **cfg)
    return out


@triton.jit
def _int4_swap_kernel(x_ptr, w_ptr, s_ptr, out_ptr, M, N, K, BLOCKS, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, GROUP: tl.constexpr, GROUP_M: tl.constexpr):
    """Symmetric int4 from the row layout with the operands swapped: ``out.T = W @ x.T``, so the
    dequantized weight tile is the left operand, which Hopper's wgmma may read from registers
    (no shared-memory round trip), and ``x.T`` the right one, loaded as it lies (K-major)."""
    pid_n, pid_m = _grouped(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(M, BLOCK_M), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rb = tl.arange(0, BLOCK_K // 2)
    rk = tl.arange(0, BLOCK_K)
    row_bytes = K // 2
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        packed = tl.load(w_ptr + rn[:, None] * row_bytes + (k // 2 + rb)[None, :], mask=(rn < N)[:, None], other=0)
        scale = tl.load(s_ptr + rn * BLOCKS + k // GROUP, mask=rn < N, other=0.0)
        codes = tl.reshape(tl.join(packed & 0xF, packed >> 4), (BLOCK_N, BLOCK_K)).to(tl.int32) - 8
        w = (codes.to(tl.float32) * scale.to(tl.float32)[:, None]).to(x_ptr.dtype.element_ty)
        xt = tl.load(x_ptr + rm[None, :] * K + (k + rk)[:, None], mask=(rm < M)[None, :], other=0.0)
        acc = tl.dot(w, xt, acc)
    tl.store(out_ptr + rm[None, :] * N + rn[:, None], acc.to(out_ptr.dtype.element_ty),
             mask=(rm < M)[None, :] & (rn < N)[:, None])


def int4_swap(x: torch.Tensor, rows: tuple, config: dict, biased: bool = False) -> torch.Tensor:
    """``x @ W.T`` by :func:`_int4_swap_kernel`, or with ``biased`` by :func:`_int4_swap_biased_kernel`."""
    codes, scales = rows[0], rows[1]
    m, k = x.shape
    n, blocks = scales.shape
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]),)
    if biased:
        bias = {torch.bfloat16: 128.0, torch.float16: 1024.0}.get(x.dtype, 0.0)
        _int4_swap_biased_kernel[grid](x, codes, scales, out, m, n, k, blocks, bias, GROUP=k // blocks, **config)
    else:
        _int4_swap_kernel[grid](x, codes, scales, out, m, n, k, blocks, GROUP=k // blocks, **config)
    return out


@triton.jit
def _biased_codes(nibbles, dtype: tl.constexpr):
    """Codes ``c`` (0..15) as the floats ``BIAS + c``, exactly, by OR-ing them into the mantissa of
    ``BIAS`` (128 in bf16, 1024 in fp16): no integer-to-float conversion. In fp32, whose products
    would lose the code to the bias, the bias is taken off at once (``BIAS`` 0)."""
    if dtype == tl.bfloat16:
        codes = (nibbles.to(tl.int16) | 0x4300).to(tl.bfloat16, bitcast=True)
    elif dtype == tl.float16:
        codes = (nibbles.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True)
    else:
        codes = (nibbles.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    return codes


@triton.jit
def _int4_swap_biased_kernel(x_ptr, w_ptr, s_ptr, out_ptr, M, N, K, BLOCKS, BIAS, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
                             GROUP_M: tl.constexpr):
    """As :func:`_int4_swap_kernel`, with the cheapest unpacking: the weight tile enters the product
    as ``BIAS + c`` (an AND and an OR per code), and ``(BIAS + 8) * sum(x)`` and the block scale
    (one per tile: ``BLOCK_K`` divides ``GROUP``) are applied to the product afterwards."""
    pid_n, pid_m = _grouped(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(M, BLOCK_M), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rb = tl.arange(0, BLOCK_K // 2)
    rk = tl.arange(0, BLOCK_K)
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        packed = tl.load(w_ptr + rn[:, None] * (K // 2) + (k // 2 + rb)[None, :], mask=(rn < N)[:, None], other=0)
        w = tl.reshape(tl.join(_biased_codes(packed & 0xF, dtype), _biased_codes(packed >> 4, dtype)),
                       (BLOCK_N, BLOCK_K))
        xt = tl.load(x_ptr + rm[None, :] * K + (k + rk)[:, None], mask=(rm < M)[None, :], other=0.0)
        part = tl.dot(w, xt) - (BIAS + 8.0) * tl.sum(xt.to(tl.float32), axis=0)[None, :]
        scale = tl.load(s_ptr + rn * BLOCKS + k // GROUP, mask=rn < N, other=0.0).to(tl.float32)
        acc += part * scale[:, None]
    tl.store(out_ptr + rm[None, :] * N + rn[:, None], acc.to(out_ptr.dtype.element_ty),
             mask=(rm < M)[None, :] & (rn < N)[:, None])
