"""Helpers shared by the kernels: configuration grids, the split-K output zeroing, the output tile store."""
from __future__ import annotations

import triton
import triton.language as tl


def zero_output(nargs) -> None:
    """Split-K programs add into the output: it starts at zero (run before each timed launch too)."""
    nargs["out_ptr"].zero_()


def grid(keys: tuple[str, ...], rows: list[tuple], flag: str, flag_values: tuple[int, ...] = (0, 1),
         zero=zero_output) -> list[triton.Config]:
    """One config per row (``keys`` values, then ``num_warps``) and per value of the switch ``flag``;
    ``zero(nargs)`` clears the output before split-K configurations."""
    out = []
    for *values, warps in rows:
        split_k = dict(zip(keys, values)).get("SPLIT_K", 1)
        for on in flag_values:
            out.append(triton.Config(dict(zip(keys, values), **{flag: on}), num_warps=warps, num_stages=3,
                                     pre_hook=zero if split_k > 1 else None))
    return out


@triton.jit
def store_tile(acc, bias_ptr, out_ptr, rm, rn, mask_m, mask_n, stride_om, pid_k,
               HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """``acc`` (+ bias, added by the first K split only) into ``out``: a store, or atomic adds under split K."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=mask_n & (pid_k == 0), other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rm[:, None] * stride_om + rn[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out, acc.to(out_ptr.dtype.element_ty), mask=mask, sem="relaxed")
