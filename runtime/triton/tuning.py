"""Autotuning helpers shared by the kernels: configuration grids and the split-K output zeroing."""
from __future__ import annotations

import triton


def zero_output(nargs) -> None:
    """Split-K programs add into the output: it starts at zero (run before each timed launch too)."""
    nargs["out_ptr"].zero_()


def grid(keys: tuple[str, ...], rows: list[tuple], flag: str, flag_values: tuple[int, ...] = (0, 1)) -> list[triton.Config]:
    """One config per row (``keys`` values, then ``num_warps``) and per value of the switch ``flag``."""
    out = []
    for *values, warps in rows:
        split_k = dict(zip(keys, values)).get("SPLIT_K", 1)
        for on in flag_values:
            out.append(triton.Config(dict(zip(keys, values), **{flag: on}), num_warps=warps, num_stages=3,
                                     pre_hook=zero_output if split_k > 1 else None))
    return out
