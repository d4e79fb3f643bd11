"""Weight-only int4/int8 matmul for prefill-sized batches: dequantize, then cuBLAS.

At hundreds of rows a matmul is bound by arithmetic, not by reading the weight, so the fused
kernels' saving (reading 4 or 8 bits a weight) no longer pays for their dequantization in the
inner loop. Here one pass writes the weight in ``x``'s dtype, transposed to ``(K, N)``, from
:func:`gemv_words.prepare_words`'s words; cuBLAS's bf16/fp16 GEMM reads it. The extra traffic
is one read of the packed weight and one write of the float one, a fixed cost that a large
batch amortises. Peak memory: the float weight of one linear, freed after the call.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from presso.runtime.triton import tuning

# weight_only_matmul takes this path from MIN_ROWS rows: where `python3 -m benchmarks.gpu_prefill`
# measured it ahead of the fused kernel
MIN_ROWS = 256


@triton.jit
def _dequant_words_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, WORDS, BITS: tl.constexpr, GROUP: tl.constexpr,
                          HAS_ZEROS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr):
    CPW: tl.constexpr = 32 // BITS  # codes per word; code j of word w is row k = CPW * w + j
    MASK: tl.constexpr = (1 << BITS) - 1
    rw = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rw < WORDS)[:, None] & (rn < N)[None, :]
    words = tl.load(w_ptr + rw[:, None] * N + rn[None, :], mask=mask, other=0)
    for j in tl.static_range(CPW):
        rk = rw * CPW + j
        blocks = (rk // GROUP)[:, None] * N + rn[None, :]
        scale = tl.load(s_ptr + blocks, mask=mask, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zero = tl.load(z_ptr + blocks, mask=mask, other=0).to(tl.float32)
        else:
            zero = 1 << (BITS - 1)
        codes = ((words >> (j * BITS)) & MASK).to(tl.float32)
        tl.store(out_ptr + rk[:, None] * N + rn[None, :], ((codes - zero) * scale).to(out_ptr.dtype.element_ty),
                 mask=mask & (rk < K)[:, None])


def dequantize_words(words: torch.Tensor, scales_t: torch.Tensor, zeros_t: torch.Tensor | None, k: int,
                     bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The weight ``W.T`` ``(k, N)`` in ``dtype`` from the word layout."""
    n_words, n = words.shape
    group = n_words * (32 // bits) // scales_t.shape[0]
    out = torch.empty(k, n, device=words.device, dtype=dtype)
    grid = (triton.cdiv(n_words, 8), triton.cdiv(n, 128))
    _dequant_words_kernel[grid](words, scales_t, zeros_t if zeros_t is not None else words, out, n, k, n_words,
                                BITS=bits, GROUP=group, HAS_ZEROS=zeros_t is not None, BLOCK_W=8, BLOCK_N=128,
                                num_warps=4)
    return out


def dequantize_matmul(x: torch.Tensor, words: torch.Tensor, scales_t: torch.Tensor, zeros_t: torch.Tensor | None,
                      k: int, bits: int, bias: torch.Tensor | None = None, gated: bool = False) -> torch.Tensor:
    """``x (..., k) @ W.T (+ bias)``: the weight dequantized once, then one cuBLAS GEMM (``gated``: as
    :func:`gemm_words.gemm_words`; at these sizes the gating is a small elementwise pass of its own)."""
    x = tuning.silu_gate(x) if gated else x
    w_t = dequantize_words(words, scales_t, zeros_t, k, bits, x.dtype)
    out = torch.matmul(x, w_t)
    return out if bias is None else out + bias.to(out.dtype)
