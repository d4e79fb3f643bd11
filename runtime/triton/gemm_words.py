"""Weight-only int4/int8 matmul for a few to a few dozen rows, on tensor cores, from the word layout.

:func:`gemv_words.prepare_words`'s copy of the weight (32-bit words of codes along K,
transposed to ``(K / codes_per_word, N)``) is read here too: a tile of ``TILE_W`` words by
``BLOCK_N`` columns is one coalesced load. Code ``j`` of every word in the tile is a
``(TILE_W, BLOCK_N)`` slice of rows ``k = codes_per_word * w + j``; it meets the matching
strided columns of ``x`` in its own ``tl.dot``, so no code is ever moved between lanes to
restore K order. Codes convert to float exactly (``c - zero`` is an integer under 256) and
the block scale is applied once per tile, after the products.

The tile's columns of ``x`` come in one contiguous load (which the compiler can pipeline)
and are split into the strided slices in registers. ``PAIRS`` (symmetric int4, 16-bit
activations) unpacks two codes per instruction as packed half-precision pairs.
Split-K programs add into the zeroed output.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from presso.runtime.triton import pins, tuning


def _configs() -> list[triton.Config]:
    # split slices (UNPACK=0), from an H100 sweep at M=16 and M=64 (4096x4096, 11008x4096): 16 words a tile
    rows = [(16, 64, 8, 4, 3), (16, 128, 16, 4, 2), (16, 256, 16, 4, 2), (16, 128, 8, 4, 3), (16, 64, 16, 4, 3),
            (32, 256, 8, 4, 3), (64, 128, 8, 4, 2), (64, 64, 4, 4, 3), (64, 64, 8, 4, 3)]
    out = [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, TILE_W=16, SPLIT_K=sk, PAIRS=pairs, UNPACK=0),
                         num_warps=warps, num_stages=stages, pre_hook=tuning.zero_output if sk > 1 else None)
           for bm, bn, sk, warps, stages in rows for pairs in (0, 1)]
    # one tile unpacked in K order (UNPACK=1): one tl.dot over the whole tile, x loaded as it lies
    unpacked = [(16, 64, 16, 4, 4, 4), (16, 128, 16, 4, 4, 3), (16, 64, 8, 8, 4, 4), (32, 64, 16, 4, 4, 3),
                (32, 128, 16, 2, 4, 3), (64, 64, 16, 4, 4, 3), (64, 128, 16, 2, 8, 3), (64, 128, 16, 1, 4, 4),
                (128, 128, 16, 1, 8, 3), (128, 256, 16, 1, 8, 3), (64, 256, 16, 1, 8, 3), (128, 128, 8, 1, 4, 4)]
    out += [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, TILE_W=tw, SPLIT_K=sk, PAIRS=0, UNPACK=1), num_warps=warps,
                          num_stages=stages, pre_hook=tuning.zero_output if sk > 1 else None)
            for bm, bn, tw, sk, warps, stages in unpacked]
    return tuning.merged(out, tuning.tuned_configs("gemm_words"))


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    m, n, words = args["M"], args["N"], args["WORDS"]
    pairs_ok = args["BITS"] == 4 and not args["HAS_ZEROS"] and args["x_ptr"].dtype in (torch.bfloat16, torch.float16)
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, triton.next_power_of_2(m))
            and tuning.split_ok(words, c.kwargs["TILE_W"], c.kwargs["SPLIT_K"])
            and c.kwargs["BLOCK_N"] <= max(64, triton.next_power_of_2(n))
            and (pairs_ok or not c.kwargs["PAIRS"])]
    return kept or [triton.Config(dict(BLOCK_M=16, BLOCK_N=64, TILE_W=16, SPLIT_K=1, PAIRS=0, UNPACK=0),
                                  num_warps=4)]


@triton.jit
def _dot_code(part, x_j, words, j: tl.constexpr, offset, scale, BITS: tl.constexpr, MASK: tl.constexpr,
              ONE_SCALE: tl.constexpr, dtype: tl.constexpr):
    """``part + x_j @ (code j of each word - zero)``, scaled per element unless the tile has one scale."""
    codes = (((words >> (j * BITS)) & MASK) | 0x4B000000).to(tl.float32, bitcast=True) - offset
    w_j = codes.to(dtype) if ONE_SCALE else (codes * scale).to(dtype)  # c - zero: an integer under 256, exact
    return tl.dot(x_j, w_j, part)


def _pair_asm_text(magic: str, one: str, minus: str, kind: str) -> tl.constexpr:
    return tl.constexpr(f"""{{
    .reg .b32 t, nib, mag, one, neg;
    mov.b32 nib, 0x000F000F;
    mov.b32 mag, {magic};
    mov.b32 one, {one};
    mov.b32 neg, {minus};
    lop3.b32 t, $2, nib, mag, 0xEA;
    fma.rn.{kind} t, t, one, neg;
    mov.b32 {{$0, $1}}, t;
    }}""")


# per half: magic (128 or 1024, whose last mantissa bit is worth 1), 1.0, minus (magic + 8)
_PAIR_BF16 = _pair_asm_text("0x43004300", "0x3F803F80", "0xC308C308", "bf16x2")
_PAIR_F16 = _pair_asm_text("0x64006400", "0x3C003C00", "0xE408E408", "f16x2")


@triton.jit
def _pair_asm(words, BF16: tl.constexpr):
    """Codes 0 and 4 of each word (low bits of each half) as two 16-bit floats ``c - 8``, exactly.

    ``w & 0x000F000F | magic`` puts a code under the exponent of 128 (bf16) or 1024 (fp16) in
    each half; one packed FMA subtracts 136 or 1032 from both: three instructions per two codes.
    """
    if BF16:
        lo, hi = tl.inline_asm_elementwise(_PAIR_BF16, "=h,=h,r", [words], dtype=(tl.bfloat16, tl.bfloat16),
                                           is_pure=True, pack=1)
    else:
        lo, hi = tl.inline_asm_elementwise(_PAIR_F16, "=h,=h,r", [words], dtype=(tl.float16, tl.float16),
                                           is_pure=True, pack=1)
    return lo, hi


@triton.jit
def _dot_pair(part, x_lo, x_hi, words, j: tl.constexpr, scale, ONE_SCALE: tl.constexpr, dtype: tl.constexpr):
    lo, hi = _pair_asm(words >> (4 * j), dtype == tl.bfloat16)
    if not ONE_SCALE:
        lo = (lo.to(tl.float32) * scale).to(dtype)
        hi = (hi.to(tl.float32) * scale).to(dtype)
    return tl.dot(x_hi, hi, tl.dot(x_lo, lo, part))


@triton.jit
def _dot_unpacked(part, xt, words, offset, scale, BITS: tl.constexpr, MASK: tl.constexpr, CPW: tl.constexpr,
                  ONE_SCALE: tl.constexpr, HAS_ZEROS: tl.constexpr, dtype: tl.constexpr):
    """``part + xt @ W_tile``: every code of the ``(TILE_W, BLOCK_N)`` words, in K order, in one product.

    Code ``j`` of word ``w`` is row ``CPW * w + j``: broadcasting the words against the shifts
    gives ``(TILE_W, CPW, BLOCK_N)``, which reshapes to the ``(TILE_W * CPW, BLOCK_N)`` tile.
    """
    shifts = tl.arange(0, CPW) * BITS
    w = (((words[:, None, :] >> shifts[None, :, None]) & MASK) | 0x4B000000).to(tl.float32, bitcast=True)
    if HAS_ZEROS:  # offset (1, BLOCK_N) for a tile in one block, else (TILE_W, BLOCK_N)
        w = w - offset[:, None, :]
    else:
        w = w - offset
    if not ONE_SCALE:
        w = w * scale[:, None, :]
    w = tl.reshape(w.to(dtype), (xt.shape[1], w.shape[2]))
    return tl.dot(xt, w, part)


@triton.autotune(configs=_configs(), key=["ROWS", "N", "K", "GROUP", "BITS", "GATED"],
                 prune_configs_by={"early_config_prune": _prune},
                 do_bench=tuning.bench_in_graph)
@triton.jit
def _gemm_words_kernel(x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, M, N, K, WORDS, stride_xm, stride_om, ROWS,
                       BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILE_W: tl.constexpr, SPLIT_K: tl.constexpr,
                       PAIRS: tl.constexpr, UNPACK: tl.constexpr, GATED: tl.constexpr):
    CPW: tl.constexpr = 32 // BITS  # codes per word
    MASK: tl.constexpr = (1 << BITS) - 1
    WPG: tl.constexpr = GROUP // CPW  # words per quantization block
    ONE_SCALE: tl.constexpr = WPG % TILE_W == 0  # the tile sits inside one block: scale after the products
    tiles = tl.cdiv(WORDS, TILE_W)
    rm, rn, mask_m, mask_n, pid_k, first, last = tuning.program_tiles(M, N, tiles, BLOCK_M, BLOCK_N, SPLIT_K)
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(first, last):
        rw = t * TILE_W + tl.arange(0, TILE_W)
        mask_w = rw < WORDS
        mask = mask_w[:, None] & mask_n[None, :]
        words = tl.load(w_ptr + rw[:, None] * N + rn[None, :], mask=mask, other=0)
        if ONE_SCALE:
            block = (t * TILE_W) // WPG
            scale = tl.load(s_ptr + block * N + rn, mask=mask_n, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                zero = tl.load(z_ptr + block * N + rn, mask=mask_n, other=0).to(tl.float32)[None, :]
            else:
                zero = 1 << (BITS - 1)
        else:
            blocks = (rw // WPG)[:, None] * N + rn[None, :]
            scale = tl.load(s_ptr + blocks, mask=mask, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                zero = tl.load(z_ptr + blocks, mask=mask, other=0).to(tl.float32)
            else:
                zero = 1 << (BITS - 1)
        offset = zero + 8388608.0  # codes are read as 2**23 + c
        part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # one contiguous (pipelined) load of x, split into the CPW strided slices in registers
        rk = t * TILE_W * CPW + tl.arange(0, TILE_W * CPW)
        xt = tuning.load_x(x_ptr, rm[:, None] * stride_xm, rk[None, :], mask_m[:, None] & (rk < K)[None, :], K, GATED)
        if UNPACK:
            part = _dot_unpacked(part, xt, words, offset, scale, BITS, MASK, CPW, ONE_SCALE, HAS_ZEROS, dtype)
        elif CPW == 8:
            even, odd = tl.split(tl.reshape(xt, (BLOCK_M, TILE_W, 4, 2)))
            x04, x26 = tl.split(tl.reshape(even, (BLOCK_M, TILE_W, 2, 2)))
            x15, x37 = tl.split(tl.reshape(odd, (BLOCK_M, TILE_W, 2, 2)))
            x0, x4 = tl.split(x04)
            x2, x6 = tl.split(x26)
            x1, x5 = tl.split(x15)
            x3, x7 = tl.split(x37)
            if PAIRS:  # symmetric int4: codes j and j + 4 of a word come out of one register
                part = _dot_pair(part, x0, x4, words, 0, scale, ONE_SCALE, dtype)
                part = _dot_pair(part, x1, x5, words, 1, scale, ONE_SCALE, dtype)
                part = _dot_pair(part, x2, x6, words, 2, scale, ONE_SCALE, dtype)
                part = _dot_pair(part, x3, x7, words, 3, scale, ONE_SCALE, dtype)
            else:
                part = _dot_code(part, x0, words, 0, offset, scale, BITS, MASK, ONE_SCALE, dtype)
                part = _dot_code(part, x1, words, 1, offset, scale, BITS, MASK, ONE_SCALE, dtype)
                part = _dot_code(part, x2, words, 2, offset, scale, BITS, MASK, ONE_SCALE, dtype)
                part = _dot_code(part, x3, words, 3, offset, scale, BITS, MASK, ONE_SCALE, dtype)
                part = _dot_code(part, x4, words, 4, offset, scale, BITS, MASK, ONE_SCALE, dtype)
                part = _dot_code(part, x5, words, 5, offset, scale, BITS, MASK, ONE_SCALE, dtype)
                part = _dot_code(part, x6, words, 6, offset, scale, BITS, MASK, ONE_SCALE, dtype)
                part = _dot_code(part, x7, words, 7, offset, scale, BITS, MASK, ONE_SCALE, dtype)
        else:
            x02, x13 = tl.split(tl.reshape(xt, (BLOCK_M, TILE_W, 2, 2)))
            x0, x2 = tl.split(x02)
            x1, x3 = tl.split(x13)
            part = _dot_code(part, x0, words, 0, offset, scale, BITS, MASK, ONE_SCALE, dtype)
            part = _dot_code(part, x1, words, 1, offset, scale, BITS, MASK, ONE_SCALE, dtype)
            part = _dot_code(part, x2, words, 2, offset, scale, BITS, MASK, ONE_SCALE, dtype)
            part = _dot_code(part, x3, words, 3, offset, scale, BITS, MASK, ONE_SCALE, dtype)
        if ONE_SCALE:
            acc += part * scale[None, :]
        else:
            acc += part
    tuning.store_tile(acc, bias_ptr, out_ptr, rm, rn, mask_m, mask_n, stride_om, pid_k, HAS_BIAS, SPLIT_K)


def gemm_words(x: torch.Tensor, words: torch.Tensor, scales_t: torch.Tensor, zeros_t: torch.Tensor | None,
               k: int, bits: int, bias: torch.Tensor | None = None, config: dict | None = None,
               gated: bool = False) -> torch.Tensor:
    """``x (..., k) @ W.T`` from :func:`gemv_words.prepare_words`'s operands; ``scales_t`` in ``x``'s dtype.
    ``gated``: ``x`` is ``[gate | up]`` (..., 2k) and the product is ``(silu(gate) * up) @ W.T``."""
    n_words, n = words.shape
    blocks = scales_t.shape[0]
    group = n_words * (32 // bits) // blocks
    x2 = tuning.as_rows(x, (1 + gated) * k)
    m = x2.shape[0]
    if config is not None and config.get("PAIRS") and (bits != 4 or zeros_t is not None
                                                       or x.dtype not in (torch.bfloat16, torch.float16)):
        raise ValueError("PAIRS=1 (half-precision code pairs) is for symmetric int4 with 16-bit activations only")
    if config is None:  # the sweep's choice for this device, shape and row bucket, if it timed one
        key = pins.pin_key(n, k, tuning.rows_key(m), bits, group, zeros_t is None, x.dtype)
        config = pins.pinned_on("gemm_words", x.device, key)
    out, kernel, config = tuning.tiled_launch(_gemm_words_kernel, x, m, n, config)

    grid = tuning.tile_grid(m, n)
    kernel[grid](x2, words, scales_t, zeros_t if zeros_t is not None else words,
                 bias if bias is not None else scales_t, out, m, n, k, n_words, x2.stride(0), out.stride(0),
                 tuning.rows_key(m),
                 BITS=bits, GROUP=group, HAS_ZEROS=zeros_t is not None, HAS_BIAS=bias is not None, GATED=gated,
                 **({} if config is None else {"num_warps": 4, "PAIRS": 0, "UNPACK": 0} | config))
    return out.reshape(*x.shape[:-1], n)
