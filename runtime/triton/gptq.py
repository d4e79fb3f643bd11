"""GPTQ's column loop as one Triton launch per block of columns.

GPTQ rounds a weight column by column and pushes each column's error onto the columns after it;
the loop is sequential along columns but independent across rows. In eager torch each column
costs about ten tiny kernel launches (~50 us), which on a GPU makes the loop, not the
arithmetic, the cost of a layer. Here a program owns a tile of rows of one block of columns
(held in registers) and walks its columns itself: one launch per block.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS = 16  # rows per program: a 16 x 128 float32 tile is 16 registers a thread at 4 warps


@triton.jit
def _round_half_even(x):
    """``torch.round``: to nearest, ties to even (exact where it matters, |x| < 2**22)."""
    r = tl.floor(x + 0.5)
    odd = r - 2.0 * tl.floor(r * 0.5) != 0.0
    return tl.where((r - x == 0.5) & odd, r - 1.0, r)


@triton.jit
def _gptq_columns(w_ptr, q_ptr, e_ptr, h_ptr, s_ptr, z_ptr, g_ptr, n, stride_w, stride_q, stride_s,
                  top: tl.constexpr, NCOLS: tl.constexpr, COLS: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, COLS)
    live = rows < n
    w = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :], mask=live[:, None] & (cols < NCOLS)[None, :],
                other=0.0)
    for j in range(NCOLS):
        here = cols == j
        wj = tl.sum(tl.where(here[None, :], w, 0.0), axis=1)
        g = tl.load(g_ptr + j)
        s = tl.load(s_ptr + rows * stride_s + g, mask=live, other=1.0)
        z = tl.load(z_ptr + rows * stride_s + g, mask=live, other=0.0)
        code = tl.minimum(tl.maximum(_round_half_even(wj / s) + z, 0.0), top)
        qj = (code - z) * s
        e = (wj - qj) / tl.load(h_ptr + j * COLS + j)
        h_row = tl.load(h_ptr + j * COLS + cols, mask=(cols >= j) & (cols < NCOLS), other=0.0)
        w = w - e[:, None] * h_row[None, :]
        tl.store(q_ptr + rows * stride_q + j, qj, mask=live)
        tl.store(e_ptr + rows * COLS + j, e, mask=live)


def quantize_columns(w1: torch.Tensor, hinv1: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                     groups: torch.Tensor, levels: int, q_out: torch.Tensor) -> torch.Tensor:
    """One GPTQ block: ``w1`` ``(N, c)`` float32 rounded column by column into ``q_out`` (a
    ``(N, c)`` view), each column ``j`` to the grid ``scale[:, groups[j]]``/``zero[:, groups[j]]``
    with its error pushed along ``hinv1`` ``(c, c)`` (upper Cholesky factor of the inverse
    Hessian). Returns the scaled errors ``(N, c)`` that GPTQ applies to the later columns."""
    n, c = w1.shape
    width = max(16, triton.next_power_of_2(c))
    h = torch.zeros(width, width, device=w1.device, dtype=torch.float32)
    h[:c, :c] = hinv1
    err = torch.empty(n, width, device=w1.device, dtype=torch.float32)
    w1, scale, zero = w1.contiguous(), scale.contiguous(), zero.contiguous()
    _gptq_columns[(triton.cdiv(n, ROWS),)](w1, q_out, err, h, scale, zero, groups.to(torch.int32).contiguous(),
                                           n, w1.stride(0), q_out.stride(0), scale.stride(0),
                                           top=float(levels - 1), NCOLS=c, COLS=width, ROWS=ROWS, num_warps=4)
    return err[:, :c]
