"""A pre-norm block's residual add and RMS norm, moved into the matmul that reads their result.

In a Llama-style block each of q/k/v and gate/up reads ``rms_norm(h + delta)``: the add and the
norm are one more launch before the matmul (an elementwise kernel under ``torch.compile``), and
at batch 1 on a small model a launch costs about as much as the matmul. Here the launch that
zeroes a split-K output before the batch-1 kernel (:mod:`gemv_words`) also writes
``h + delta`` (the next residual) and the row's inverse RMS; the matmul then scales ``x`` by it
and by the norm's weight as it loads it. The arithmetic is torch's: the sum rounded to the
activations' dtype, the norm in float32 with one rounding to that dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _prepare_kernel(x_ptr, res_ptr, h_ptr, stats_ptr, out_ptr, N, K, eps, BLOCK: tl.constexpr, ZERO: tl.constexpr,
                    RESIDUAL: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()  # the matmul may start loading weights now
        tl.extra.cuda.gdc_wait()  # but x, the residual and the output may still be in use before
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    if ZERO:
        tl.store(out_ptr + offs, tl.zeros((BLOCK,), dtype=out_ptr.dtype.element_ty), mask=offs < N)
    if RESIDUAL:
        mask = offs < K
        h = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) + tl.load(res_ptr + offs, mask=mask,
                                                                                 other=0.0).to(tl.float32)
        tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)
    if pid == 0:  # the whole row's sum of squares, from the inputs: no wait on the other programs
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, K, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            v = tl.load(x_ptr + cols, mask=cols < K, other=0.0)
            if RESIDUAL:
                v = (v.to(tl.float32) + tl.load(res_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)).to(v.dtype)
            v = v.to(tl.float32)
            acc += v * v
        tl.store(stats_ptr, 1.0 / tl.sqrt(tl.sum(acc, axis=0) / K + eps))


def prepare(x: torch.Tensor, residual: torch.Tensor | None, eps: float, out: torch.Tensor, zero: bool,
            pdl: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch before the batch-1 matmul: ``h = x + residual`` (``x`` itself without a residual),
    the inverse RMS of ``h`` (float32, one value) and, with ``zero``, a zeroed ``out``."""
    k = x.numel()
    h = torch.empty_like(x) if residual is not None else x
    stats = torch.empty(1, device=x.device, dtype=torch.float32)
    width = max(out.numel() if zero else 1, k if residual is not None else 1)
    _prepare_kernel[(triton.cdiv(width, BLOCK),)](
        x, residual if residual is not None else x, h, stats, out, out.numel(), k, float(eps), BLOCK=BLOCK,
        ZERO=zero, RESIDUAL=residual is not None, PDL=pdl, launch_pdl=pdl)
    return h, stats


@triton.jit
def normalize(x, cols, mask, stats_ptr, norm_ptr, NORM: tl.constexpr):
    """``x`` (loaded at ``cols``) times the inverse RMS and the norm's weight, in ``x``'s dtype."""
    if NORM:
        weight = tl.load(norm_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        x = (x.to(tl.float32) * tl.load(stats_ptr) * weight).to(x.dtype)
    return x


def add_norm(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
             eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """In torch, what :func:`prepare` and :func:`normalize` compute: ``(rms_norm(h), h)`` for ``h = x + residual``."""
    h = x if residual is None else x + residual
    return torch.nn.functional.rms_norm(h, (h.shape[-1],), norm_weight.to(h.dtype), eps), h
