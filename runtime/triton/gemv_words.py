"""Batch-1 weight-only GEMV on a word-transposed copy of the packed weight.

The row layout (:mod:`weight_only`) keeps a tile inside one quantization block, so a program
reads at most ``BLOCK_N x GROUP/2`` bytes per step: too few bytes in flight to stream the
weight at memory speed. Here the codes are regrouped once into 32-bit words along K and
transposed to ``(K / codes_per_word, N)``: neighbouring threads read neighbouring output
columns (16-byte loads), and each word unpacks into ``32 / bits`` codes. Scales (and zero
points) are transposed the same way, ``(blocks, N)``; a tile of words stays inside one
quantization block, so it loads one scale vector.

Three ways to unpack (``DEQUANT``, autotuned): 0, shift, mask and convert each code; 1, move
the code under the exponent of 1.0 (``1 + c/16``: no convert); 2, for symmetric int4, two
codes per 32-bit register as half-precision pairs (``c - 8`` in both halves by one ``lop3``
and one subtraction), multiplied by activation pairs with packed ``fma.f16x2``: half the
instructions per code, since an instruction count (an estimate, not a profile) puts the
batch-1 kernel near the limit of instruction issue rather than of memory bandwidth.

On Hopper and later the kernel is launched as a programmatic dependent launch (PDL): it
starts while the kernel before it still runs and loads its first weight tiles, which no
earlier kernel writes, before ``griddepcontrol.wait``; the activations and the output are
touched only after it. The split-K output is zeroed by a small kernel of the same kind
instead of a memset, so that the two can overlap. A batch-1 call is a few microseconds, of
which the fixed cost of one launch after another is a large part.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from presso.runtime.triton import pins, prenorm, tuning


def prepare_words(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """From :func:`weight_only.prepare`'s row operands: words ``(K/cpw, N)`` int32, scales and zeros ``(blocks, N)``."""
    n = codes.shape[0]
    words = codes.contiguous().view(torch.int32).reshape(n, -1).t().contiguous()
    return words, scales.t().contiguous(), None if zeros is None else zeros.t().contiguous()


def uses_pdl(device: torch.device) -> bool:
    """Programmatic dependent launch: compute capability 9.0 and later, unless ``PRESSO_PDL=0``."""
    return os.environ.get("PRESSO_PDL", "1") != "0" and torch.cuda.get_device_capability(device)[0] >= 9


@triton.jit
def _zero_kernel(out_ptr, N, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()  # the GEMV may start loading weights now
        tl.extra.cuda.gdc_wait()  # but ``out`` may still be in use by the kernels before
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.zeros((BLOCK,), dtype=out_ptr.dtype.element_ty), mask=offs < N)


def _zero(out: torch.Tensor, pdl: bool) -> None:
    _zero_kernel[(triton.cdiv(out.numel(), 1024),)](out, out.numel(), BLOCK=1024, PDL=pdl, launch_pdl=pdl)


def _zero_hook(nargs) -> None:
    """Split-K programs add into the output: zero it first (before each timed launch too)."""
    _zero(nargs["out_ptr"], nargs["PDL"])


def _configs() -> list[triton.Config]:
    # a tile of TILE_W words sits inside one quantization block (TILE_W divides its words);
    # many programs (SPLIT_K up to 64) keep enough loads in flight to stream the weight
    own = tuning.grid(("BLOCK_N", "TILE_W", "SPLIT_K"), [
        (512, 8, 32, 4), (512, 8, 64, 4), (1024, 4, 32, 4), (256, 4, 64, 4), (256, 8, 32, 4), (1024, 16, 32, 8),
        (256, 16, 16, 4), (128, 8, 16, 4), (128, 4, 16, 4), (512, 4, 32, 4), (64, 4, 8, 2),
        (256, 4, 16, 4), (256, 8, 8, 4), (128, 8, 8, 4),  # these three for K of a few hundred (SmolLM2)
        (1024, 8, 64, 8)],  # int8 at 4096 columns
        flag="DEQUANT", flag_values=(0, 1, 2), zero=_zero_hook)
    return tuning.merged(own, tuning.tuned_configs("gemv_words", zero=_zero_hook))


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    words, n, words_per_group = args["WORDS"], args["N"], args["GROUP"] * args["BITS"] // 32
    half2 = args["BITS"] == 4 and not args["HAS_ZEROS"]
    kept = [c for c in configs if words_per_group % c.kwargs["TILE_W"] == 0
            and tuning.split_ok(words, c.kwargs["TILE_W"], c.kwargs["SPLIT_K"])
            and c.kwargs["BLOCK_N"] <= max(64, triton.next_power_of_2(n))
            and (c.kwargs["DEQUANT"] != 2 or half2)
            and (c.kwargs["DEQUANT"] != 0 or args["BITS"] == 8)]  # plain converts won only for int8 (H100 sweep)
    return kept or [triton.Config(dict(BLOCK_N=64, TILE_W=2, SPLIT_K=1, DEQUANT=1), num_warps=4)]


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


@triton.jit
def _half2_pair(lo, hi):
    """Two activations as one 32-bit register of half precision, pre-scaled by 1/16 so that a
    lane's four products (codes -8..7) stay finite for activations up to 32k in magnitude."""
    return tl.inline_asm_elementwise("mov.b32 $0, {$1, $2};", "=r,h,h",
                                     [(lo.to(tl.float32) * 0.0625).to(tl.float16),
                                      (hi.to(tl.float32) * 0.0625).to(tl.float16)],
                                     dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _dot8_half2(words, p0, p1, p2, p3):
    """``sum_j x_j (c_j - 8) / 16`` over each word's 8 codes; ``p_k`` holds activations k and k+4.

    ``(w >> 4k) & 0x000F000F | 0x64006400`` is the half pair ``(1024 + c_k, 1024 + c_{k+4})``;
    subtracting 1032 leaves ``c - 8`` exactly, and one packed FMA takes two codes.
    """
    return tl.inline_asm_elementwise(
        """
        {
        .reg .b32 t, v, acc, bias, nib, mag;
        .reg .f16 lo, hi;
        .reg .f32 flo, fhi;
        mov.b32 bias, 0x64086408;
        mov.b32 nib, 0x000F000F;
        mov.b32 mag, 0x64006400;
        lop3.b32 v, $1, nib, mag, 0xEA;
        sub.f16x2 v, v, bias;
        mul.f16x2 acc, v, $2;
        shr.u32 t, $1, 4;
        lop3.b32 v, t, nib, mag, 0xEA;
        sub.f16x2 v, v, bias;
        fma.rn.f16x2 acc, v, $3, acc;
        shr.u32 t, $1, 8;
        lop3.b32 v, t, nib, mag, 0xEA;
        sub.f16x2 v, v, bias;
        fma.rn.f16x2 acc, v, $4, acc;
        shr.u32 t, $1, 12;
        lop3.b32 v, t, nib, mag, 0xEA;
        sub.f16x2 v, v, bias;
        fma.rn.f16x2 acc, v, $5, acc;
        mov.b32 {lo, hi}, acc;
        cvt.f32.f16 flo, lo;
        cvt.f32.f16 fhi, hi;
        add.f32 $0, flo, fhi;
        }
        """,
        "=f,r,r,r,r,r", [words, p0, p1, p2, p3], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _load_in(x_ptr, cols, mask, K, GATED: tl.constexpr, stats_ptr, norm_ptr, NORM: tl.constexpr):
    """The matmul's input at ``cols``: gated or RMS-normalized (:mod:`prenorm`) as it loads."""
    x = tuning.load_x(x_ptr, 0, cols, mask, K, GATED)
    return prenorm.normalize(x, cols, mask, stats_ptr, norm_ptr, NORM)


@triton.jit
def _x_pair(x_ptr, base, k: tl.constexpr, K, mask_w, GATED: tl.constexpr, stats_ptr, norm_ptr, NORM: tl.constexpr):
    lo = _load_in(x_ptr, base + k, mask_w & (base + k < K), K, GATED, stats_ptr, norm_ptr, NORM)
    hi = _load_in(x_ptr, base + k + 4, mask_w & (base + k + 4 < K), K, GATED, stats_ptr, norm_ptr, NORM)
    return _half2_pair(lo, hi)[:, None]


@triton.autotune(configs=_configs(), key=["N", "K", "GROUP", "BITS", "GATED", "NORM"],
                 prune_configs_by={"early_config_prune": _prune}, do_bench=tuning.bench_in_graph)
@triton.jit
def _gemv_words_kernel(x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, stats_ptr, norm_ptr, N, K, WORDS,
                       BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK_N: tl.constexpr, TILE_W: tl.constexpr, SPLIT_K: tl.constexpr, DEQUANT: tl.constexpr,
                       PDL: tl.constexpr, GATED: tl.constexpr, NORM: tl.constexpr):
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
        if PDL:  # weights, scales and zero points are constant; x may come from the kernel before
            tl.extra.cuda.gdc_wait()
        if DEQUANT == 2:  # symmetric int4: zero point 8 is subtracted inside
            base = rw * CPW
            dot = _dot8_half2(words, _x_pair(x_ptr, base, 0, K, mask_w, GATED, stats_ptr, norm_ptr, NORM),
                              _x_pair(x_ptr, base, 1, K, mask_w, GATED, stats_ptr, norm_ptr, NORM),
                              _x_pair(x_ptr, base, 2, K, mask_w, GATED, stats_ptr, norm_ptr, NORM),
                              _x_pair(x_ptr, base, 3, K, mask_w, GATED, stats_ptr, norm_ptr, NORM))
            acc += dot * (scale * 16.0)
        else:
            dot = tl.zeros((TILE_W, BLOCK_N), dtype=tl.float32)
            x_sum = tl.zeros((TILE_W,), dtype=tl.float32)
            for j in tl.static_range(CPW):
                rk = rw * CPW + j
                x = _load_in(x_ptr, rk, mask_w & (rk < K), K, GATED, stats_ptr, norm_ptr, NORM).to(tl.float32)
                dot += x[:, None] * _code(words, j * BITS, BITS, MASK, DEQUANT == 1)
                x_sum += x
            if DEQUANT == 1:  # dot = sum x (1 + c / 2**BITS)
                acc += ((dot - x_sum[:, None]) * (1 << BITS) - x_sum[:, None] * zero) * scale
            else:
                acc += (dot - x_sum[:, None] * zero) * scale
    result = tl.sum(acc, axis=0)
    if PDL:
        tl.extra.cuda.gdc_wait()  # a program with no tile still must not write before the zeroing
        tl.extra.cuda.gdc_launch_dependents()
    if HAS_BIAS:
        result += tl.load(bias_ptr + rn, mask=mask_n & (pid_k == 0), other=0.0).to(tl.float32)
    if SPLIT_K == 1:
        tl.store(out_ptr + rn, result.to(out_ptr.dtype.element_ty), mask=mask_n)
    else:
        tl.atomic_add(out_ptr + rn, result.to(out_ptr.dtype.element_ty), mask=mask_n, sem="relaxed")


def gemv_words(x: torch.Tensor, words: torch.Tensor, scales_t: torch.Tensor, zeros_t: torch.Tensor | None,
               k: int, bits: int, bias: torch.Tensor | None = None, config: dict | None = None,
               gated: bool = False, norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
               residual: torch.Tensor | None = None):
    """``x (1, k) @ W.T`` from :func:`prepare_words`'s operands; ``scales_t`` in ``x``'s dtype.
    ``gated``: ``x`` is ``[gate | up]`` (1, 2k) and the product is ``(silu(gate) * up) @ W.T``.
    ``norm_weight``: the input is ``rms_norm(x + residual)`` (:mod:`prenorm`); with a ``residual``
    the result is ``(product, x + residual)``."""
    n_words, n = words.shape
    blocks = scales_t.shape[0]
    group = n_words * (32 // bits) // blocks
    if gated and norm_weight is not None:
        raise ValueError("gemv_words: gated and norm_weight do not combine (no layer gates then normalizes)")
    if residual is not None and norm_weight is None:
        raise ValueError("gemv_words: a residual is added only before a norm (pass norm_weight)")
    x1 = x.reshape((1 + gated) * k).contiguous()
    out = torch.empty(n, device=x.device, dtype=x.dtype)
    if config is not None and config.get("DEQUANT") == 2 and (bits != 4 or zeros_t is not None):
        raise ValueError("DEQUANT=2 (half-precision pairs) is for symmetric int4 only")
    if config is not None and (n_words // blocks) % config["TILE_W"]:
        raise ValueError(f"TILE_W={config['TILE_W']} must divide the {n_words // blocks} words "
                         "of one quantization block")
    if config is None:  # the sweep's choice for this device and shape, if it timed one
        config = pins.pinned_on("gemv_words", x.device, pins.pin_key(n, k, 1, bits, group, zeros_t is None, x.dtype))
    pdl = uses_pdl(x.device)
    split = config is not None and config.get("SPLIT_K", 1) > 1
    stats = scales_t
    if norm_weight is not None:  # one launch: the residual add, the row's RMS and the split-K zeroing
        res = None if residual is None else residual.reshape(k).contiguous()
        x1, stats = prenorm.prepare(x1, res, eps, out, split, pdl)
    elif split:
        _zero(out, pdl)
    kernel = _gemv_words_kernel if config is None else _gemv_words_kernel.fn

    def grid(meta):
        return triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"]

    kernel[grid](x1, words, scales_t, zeros_t if zeros_t is not None else words,
                 bias if bias is not None else scales_t, out, stats,
                 norm_weight if norm_weight is not None else scales_t, n, k, n_words, BITS=bits, GROUP=group,
                 HAS_ZEROS=zeros_t is not None, HAS_BIAS=bias is not None, PDL=pdl, GATED=gated,
                 NORM=norm_weight is not None, launch_pdl=pdl,
                 **({} if config is None else {"num_warps": 4, "DEQUANT": 1} | config))
    y = out.reshape(*x.shape[:-1], n)
    return y if residual is None else (y, x1.reshape(x.shape))
