"""W8A8 in Triton: per-token int8 activations times per-channel int8 weights on int8 tensor cores.

``y = (q_x @ q_w) * s_x[:, None] * s_w[None, :] + bias`` with ``q_x = round(x / s_x)``,
``s_x = max|x_row| / 127``: the arithmetic of :class:`~presso.runtime.int8.DynamicInt8Linear`
(per-token mode); its int8 weight is kept ``(N, K)`` here, K contiguous.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from presso.runtime.triton import tuning


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, norm_ptr, res_ptr, h_ptr, K, stride_x, eps, BLOCK: tl.constexpr,
                          NORM: tl.constexpr, GATED: tl.constexpr, RESIDUAL: tl.constexpr):
    """One row a program. The producer's work comes first, in the same launch: with GATED the row
    is ``[gate | up]`` and the input is ``silu(gate) * up``; with NORM it is RMS-normalized and
    scaled by ``norm_ptr`` (float32 math, one rounding to the activations' dtype, as torch's
    ``rms_norm``), after adding RESIDUAL to it (the sum, rounded, is stored: the next residual);
    the result is rounded to that dtype before quantizing, as the separate kernels would store it."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < K
    x = tuning.load_x(x_ptr, row * stride_x, offs, mask, K, GATED)
    if RESIDUAL:
        x = (x.to(tl.float32) + tl.load(res_ptr + row * K + offs, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(h_ptr + row * K + offs, x, mask=mask)
    xf = x.to(tl.float32)
    if NORM:
        inv_rms = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / K + eps)
        weight = tl.load(norm_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xf = (xf * inv_rms * weight).to(x.dtype).to(tl.float32)
    scale = _row_scale(tl.max(tl.abs(xf), axis=0))
    tl.store(q_ptr + row * K + offs, _round_codes(xf, scale).to(tl.int8), mask=mask)
    tl.store(s_ptr + row, scale)


@triton.jit
def _row_scale(peak):
    return tl.where(peak > 0, peak / 127.0, 1.0)


@triton.jit
def _round_codes(x, scale):
    """``x / scale`` rounded half away from zero (float32)."""
    y = x / scale
    return tl.where(y >= 0, tl.floor(y + 0.5), tl.ceil(y - 0.5))


def quantize_rows(x: torch.Tensor, gated: bool = False, norm_weight: torch.Tensor | None = None,
                  eps: float = 1e-6, residual: torch.Tensor | None = None):
    """Per-row symmetric int8 codes and float32 scales of a 2-D ``x``, in one launch with the
    producer's work: ``gated``, ``x`` is ``[gate | up]`` and ``silu(gate) * up`` is quantized;
    ``norm_weight``, ``rms_norm(x + residual, norm_weight, eps)`` is (gated and normalized do not
    combine), and with a ``residual`` the result is ``(codes, scales, x + residual)``."""
    if gated and norm_weight is not None:
        raise ValueError("quantize_rows: gated and norm_weight do not combine (no layer gates then normalizes)")
    if residual is not None and norm_weight is None:
        raise ValueError("quantize_rows: a residual is added only before a norm (pass norm_weight)")
    m, k = x.shape[0], x.shape[1] // (1 + gated)
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = torch.empty(m, k, device=x.device, dtype=torch.int8)
    s = torch.empty(m, device=x.device, dtype=torch.float32)
    block = triton.next_power_of_2(k)
    norm = norm_weight.contiguous() if norm_weight is not None else s
    res = None if residual is None else residual.reshape(m, k).contiguous()
    h = None if residual is None else torch.empty(m, k, device=x.device, dtype=x.dtype)
    _quantize_rows_kernel[(m,)](x, q, s, norm, res if res is not None else s, h if h is not None else s, k,
                                x.stride(0), float(eps), BLOCK=block, NORM=norm_weight is not None, GATED=gated,
                                RESIDUAL=residual is not None, num_warps=min(16, max(1, block // 512)))
    return (q, s) if residual is None else (q, s, h)


def _configs() -> list[triton.Config]:
    out = []
    for block_m, block_n, block_k, split_k, warps, stages in [
        (16, 64, 128, 1, 4, 4), (16, 64, 256, 4, 4, 3), (16, 32, 256, 8, 4, 3), (16, 128, 128, 2, 4, 4),
        (32, 64, 128, 1, 4, 4), (32, 128, 128, 2, 4, 4),
        (32, 64, 128, 4, 4, 4), (32, 64, 256, 4, 4, 3),
        (64, 64, 128, 1, 4, 4), (64, 128, 128, 1, 4, 4), (64, 128, 128, 2, 8, 3), (64, 256, 128, 1, 8, 3),
        (64, 128, 256, 1, 8, 3), (128, 128, 128, 1, 8, 3), (128, 256, 64, 1, 8, 4),
        # split K for shapes with few output tiles (N = 4096 at 64 rows is 32-64 tiles for 132 SMs)
        (64, 64, 128, 4, 4, 4), (64, 64, 256, 4, 4, 3), (64, 128, 128, 4, 8, 3), (64, 64, 128, 8, 4, 4),
    ]:
        out.append(triton.Config(dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k),
                                 num_warps=warps, num_stages=stages,
                                 pre_hook=tuning.zero_output if split_k > 1 else None))
    return out


def _prune(configs, named_args, **kwargs):
    m = {**named_args, **kwargs}["M"]
    want = min(128, max(16, triton.next_power_of_2(m)))
    return [c for c in configs if c.kwargs["BLOCK_M"] == want] or configs[:1]


@triton.autotune(configs=_configs(), key=["ROWS", "N", "K"],
                 prune_configs_by={"early_config_prune": _prune}, do_bench=tuning.bench_in_graph)
@triton.jit
def _w8a8_kernel(q_ptr, sx_ptr, w_ptr, sw_ptr, bias_ptr, out_ptr, M, N, K, stride_om, ROWS,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 SPLIT_K: tl.constexpr):
    tiles = tl.cdiv(K, BLOCK_K)
    rm, rn, mask_m, mask_n, pid_k, first, last = tuning.program_tiles(M, N, tiles, BLOCK_M, BLOCK_N, SPLIT_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for t in range(first, last):
        rk = t * BLOCK_K + tl.arange(0, BLOCK_K)
        a = tl.load(q_ptr + rm[:, None] * K + rk[None, :], mask=mask_m[:, None] & (rk < K)[None, :], other=0)
        b = tl.load(w_ptr + rn[None, :] * K + rk[:, None], mask=(rk < K)[:, None] & mask_n[None, :], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    sx = tl.load(sx_ptr + rm, mask=mask_m, other=0.0)
    sw = tl.load(sw_ptr + rn, mask=mask_n, other=0.0)
    y = acc.to(tl.float32) * sx[:, None] * sw[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=mask_n & (pid_k == 0), other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rm[:, None] * stride_om + rn[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(out, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out, y.to(out_ptr.dtype.element_ty), mask=mask, sem="relaxed")


def _fused_configs() -> list[triton.Config]:
    rows = [(16, 64, 128, 1, 4, 4), (16, 64, 256, 4, 4, 3), (16, 32, 256, 8, 4, 3), (16, 128, 128, 2, 4, 4),
            (32, 64, 128, 1, 4, 4), (32, 64, 128, 4, 4, 4), (32, 128, 128, 2, 4, 4),
            (64, 64, 128, 1, 4, 4), (64, 128, 128, 1, 4, 4), (64, 64, 128, 4, 4, 4), (64, 64, 256, 4, 4, 3)]
    return [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk), num_warps=w, num_stages=st,
                          pre_hook=tuning.zero_output if sk > 1 else None) for bm, bn, bk, sk, w, st in rows]


@triton.autotune(configs=_fused_configs(), key=["ROWS", "N", "K"],
                 prune_configs_by={"early_config_prune": _prune}, do_bench=tuning.bench_in_graph)
@triton.jit
def _w8a8_fused_kernel(x_ptr, w_ptr, sw_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_om, ROWS,
                       HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       SPLIT_K: tl.constexpr):
    """The activations quantized in the prologue: each program finds its rows' peaks over K (the
    rows come from L2 after the first program), then rounds each tile as it loads it, so no
    codes are written and one launch does the whole linear."""
    tiles = tl.cdiv(K, BLOCK_K)
    rm, rn, mask_m, mask_n, pid_k, first, last = tuning.program_tiles(M, N, tiles, BLOCK_M, BLOCK_N, SPLIT_K)
    peak = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for t in range(0, tiles):
        rk = t * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=mask_m[:, None] & (rk < K)[None, :],
                    other=0.0)
        peak = tl.maximum(peak, tl.max(tl.abs(x.to(tl.float32)), axis=1))
    sx = _row_scale(peak)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for t in range(first, last):
        rk = t * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=mask_m[:, None] & (rk < K)[None, :],
                    other=0.0)
        a = _round_codes(x.to(tl.float32), sx[:, None]).to(tl.int8)
        b = tl.load(w_ptr + rn[None, :] * K + rk[:, None], mask=(rk < K)[:, None] & mask_n[None, :], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    sw = tl.load(sw_ptr + rn, mask=mask_n, other=0.0)
    y = acc.to(tl.float32) * sx[:, None] * sw[None, :]
    tuning.store_tile(y, bias_ptr, out_ptr, rm, rn, mask_m, mask_n, stride_om, pid_k, HAS_BIAS, SPLIT_K)


def w8a8_fused_matmul(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                      bias: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """:func:`w8a8_matmul` in one launch: the per-token quantization inside the GEMM (the same
    codes and scales, so the same result)."""
    n, k = weight.shape
    x2 = tuning.as_rows(x, k)
    m = x2.shape[0]
    out, kernel, config = tuning.tiled_launch(_w8a8_fused_kernel, x, m, n, config, tuning.SMALL_TILES)
    grid = tuning.tile_grid(m, n)
    kernel[grid](x2, weight, weight_scale, bias if bias is not None else weight_scale, out, m, n, k, x2.stride(0),
                 out.stride(0), tuning.rows_key(m), HAS_BIAS=bias is not None, **(config or {}))
    return out.reshape(*x.shape[:-1], n)


def w8a8_matmul(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                bias: torch.Tensor | None = None, config: dict | None = None, gated: bool = False,
                norm_weight: torch.Tensor | None = None, eps: float = 1e-6, residual: torch.Tensor | None = None):
    """``x (..., K)`` times the int8 ``weight (N, K)`` (K contiguous, as Hopper's 8-bit tensor cores
    read it) with per-channel ``weight_scale (N,)``. ``gated`` (``x`` is ``[gate | up]``, 2K wide)
    and ``norm_weight`` (the input is ``rms_norm(x + residual)``) run in the quantization's launch:
    :func:`quantize_rows`; with a ``residual`` the result is ``(product, x + residual)``."""
    n, k = weight.shape
    q, sx, *h = quantize_rows(x.reshape(-1, (1 + gated) * k), gated, norm_weight, eps, residual)
    m = q.shape[0]
    out, kernel, config = tuning.tiled_launch(_w8a8_kernel, x, m, n, config, tuning.SMALL_TILES)
    grid = tuning.tile_grid(m, n)
    kernel[grid](q, sx, weight, weight_scale, bias if bias is not None else weight_scale, out, m, n, k,
                 out.stride(0), tuning.rows_key(m), HAS_BIAS=bias is not None, **(config or {}))
    y = out.reshape(*x.shape[:-1], n)
    return (y, h[0].reshape(x.shape)) if h else y
