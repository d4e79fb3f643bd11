"""Batch-1 weight-only GEMV on a word-transposed copy of the packed weight.

The row layout (:mod:`weight_only`) keeps a tile inside one quantization block, so a program
reads at most ``BLOCK_N x GROUP/2`` bytes per step: too few bytes in flight to stream the
weight at memory speed. Here the codes are regrouped once into 32-bit words along K and
transposed to ``(K / codes_per_word, N)``: neighbouring threads read neighbouring output
columns (16-byte loads), a step spans any number of quantization blocks, and each word
unpacks into ``32 / bits`` codes with shifts and masks. Scales (and zero points) are
transposed the same way, ``(blocks, N)``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from presso.runtime.triton import tuning


def prepare_words(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """From :func:`weight_only.prepare`'s row operands: words ``(K/cpw, N)`` int32, scales and zeros ``(blocks, N)``."""
    n = codes.shape[0]
    words = codes.contiguous().view(torch.int32).reshape(n, -1).t().contiguous()
    return words, scales.t().contiguous(), None if zeros is None else zeros.t().contiguous()


def _configs() -> list[triton.Config]:
    # a tile of TILE_W words sits inside one quantization block (TILE_W divides its words);
    # many programs (SPLIT_K up to 32) keep enough loads in flight to stream the weight
    return tuning.grid(("BLOCK_N", "TILE_W", "SPLIT_K"), [
        (512, 8, 32, 4), (512, 8, 16, 4), (1024, 16, 32, 8), (1024, 8, 32, 8), (256, 16, 16, 4), (512, 16, 8, 4),
        (256, 8, 32, 4), (128, 8, 16, 4), (128, 4, 16, 4), (512, 4, 32, 4), (256, 4, 16, 4), (64, 4, 8, 2)],
        flag="ONE_PLUS")


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    words, n, words_per_group = args["WORDS"], args["N"], args["GROUP"] * args["BITS"] // 32
    kept = [c for c in configs if words_per_group % c.kwargs["TILE_W"] == 0
            and c.kwargs["TILE_W"] * c.kwargs["SPLIT_K"] <= max(words, 16)
            and c.kwargs["BLOCK_N"] <= max(64, triton.next_power_of_2(n))]
    return kept or [triton.Config(dict(BLOCK_N=64, TILE_W=2, SPLIT_K=1, ONE_PLUS=1), num_warps=4)]


@triton.jit
def _code(words, pos: tl.constexpr, BITS: tl.constexpr, MASK: tl.constexpr, ONE_PLUS: tl.constexpr):
    """The code at bit ``pos`` of each word, as float32: ``c`` or, with ONE_PLUS, ``1 + c / 2**BITS``.

    ONE_PLUS moves the code to the top of a float's mantissa under the exponent of 1.0: a shift
    and one and-or, no conversion or subtraction per code (the sums correct for it once).
    """
    if ONE_PLUS:
        TOP: tl.constexpr = 23 - BITS
        if pos <= TOP:
            moved = words << (TOP - pos)
        else:
            moved = words >> (pos - TOP)
        return ((moved & (MASK << TOP)) | 0x3F800000).to(tl.float32, bitcast=True)
    return (((words >> pos) & MASK) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.autotune(configs=_configs(), key=["N", "K", "GROUP", "BITS"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _gemv_words_kernel(x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, N, K, WORDS,
                       BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK_N: tl.constexpr, TILE_W: tl.constexpr, SPLIT_K: tl.constexpr, ONE_PLUS: tl.constexpr):
    CPW: tl.constexpr = 32 // BITS  # codes per word
    MASK: tl.constexpr = (1 << BITS) - 1
    WPG: tl.constexpr = GROUP // CPW  # words per quantization block
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = rn < N
    tiles = tl.cdiv(WORDS, TILE_W)
    per_split = tl.cdiv(tiles, SPLIT_K)
    acc = tl.zeros((TILE_W, BLOCK_N), dtype=tl.float32)
    for t in range(pid_k * per_split, min((pid_k + 1) * per_split, tiles)):
        rw = t * TILE_W + tl.arange(0, TILE_W)
        mask_w = rw < WORDS
        mask = mask_w[:, None] & mask_n[None, :]
        words = tl.load(w_ptr + rw[:, None] * N + rn[None, :], mask=mask, other=0)
        block = (t * TILE_W) // WPG  # the tile's one quantization block
        scale = tl.load(s_ptr + block * N + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if HAS_ZEROS:
            zero = tl.load(z_ptr + block * N + rn, mask=mask_n, other=0).to(tl.float32)[None, :]
        else:
            zero = 1 << (BITS - 1)
        dot = tl.zeros((TILE_W, BLOCK_N), dtype=tl.float32)
        x_sum = tl.zeros((TILE_W,), dtype=tl.float32)
        for j in tl.static_range(CPW):
            rk = rw * CPW + j
            x = tl.load(x_ptr + rk, mask=mask_w & (rk < K), other=0.0).to(tl.float32)
            dot += x[:, None] * _code(words, j * BITS, BITS, MASK, ONE_PLUS)
            x_sum += x
        if ONE_PLUS:  # dot = sum x (1 + c / 2**BITS)
            acc += ((dot - x_sum[:, None]) * (1 << BITS) - x_sum[:, None] * zero) * scale
        else:
            acc += (dot - x_sum[:, None] * zero) * scale
    result = tl.sum(acc, axis=0)
    if HAS_BIAS:
        result += tl.load(bias_ptr + rn, mask=mask_n & (pid_k == 0), other=0.0).to(tl.float32)
    if SPLIT_K == 1:
        tl.store(out_ptr + rn, result.to(out_ptr.dtype.element_ty), mask=mask_n)
    else:
        tl.atomic_add(out_ptr + rn, result.to(out_ptr.dtype.element_ty), mask=mask_n, sem="relaxed")


def gemv_words(x: torch.Tensor, words: torch.Tensor, scales_t: torch.Tensor, zeros_t: torch.Tensor | None,
               k: int, bits: int, bias: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """``x (1, k) @ W.T`` from :func:`prepare_words`'s operands; ``scales_t`` in ``x``'s dtype."""
    n_words, n = words.shape
    blocks = scales_t.shape[0]
    group = n_words * (32 // bits) // blocks
    x1 = x.reshape(k).contiguous()
    out = torch.empty(n, device=x.device, dtype=x.dtype)
    if config is not None and (n_words // blocks) % config["TILE_W"]:
        raise ValueError(f"TILE_W={config['TILE_W']} must divide the {n_words // blocks} words of one quantization block")
    if config is not None and config.get("SPLIT_K", 1) > 1:
        out.zero_()
    kernel = _gemv_words_kernel if config is None else _gemv_words_kernel.fn

    def grid(meta):
        return triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"]

    kernel[grid](x1, words, scales_t, zeros_t if zeros_t is not None else words,
                 bias if bias is not None else scales_t, out, n, k, n_words, BITS=bits, GROUP=group,
                 HAS_ZEROS=zeros_t is not None, HAS_BIAS=bias is not None,
                 **({} if config is None else {"num_warps": 4, "ONE_PLUS": 1} | config))
    return out.reshape(*x.shape[:-1], n)
