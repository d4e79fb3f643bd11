"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's
rounding error onto the columns not yet quantized, weighted by the inverse Hessian of the
layer's inputs, so the layer's output on calibration data moves as little as possible.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from presso.passes.common.solve import damped
from presso.runtime.quant import (
    QuantizedWeight,
    WeightFormat,
    fake_quantize,
    group_params,
    pad_to_blocks,
    quantize_weight,
)


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``, more damping if needed."""
    for attempt in range(6):
        try:
            lower = torch.linalg.cholesky(damped(h, damp * 10**attempt).to(h.dtype))
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise torch.linalg.LinAlgError("the calibration Hessian stays singular after damping")


def _params(w: torch.Tensor, fmt: WeightFormat, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group scale/zero ``(N, G)`` from ``w`` ``(N, G*group)`` (zero-padded if ragged)."""
    n = w.shape[0]
    return group_params(pad_to_blocks(w, group).view(n, -1, group), fmt)


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    fmt: WeightFormat,
    *,
    damp: float = 0.01,
    act_order: bool = False,
    block: int = 128,
    fixed: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> QuantizedWeight:
    """``weight`` ``(N, K)``, ``hessian`` ``(K, K)`` = mean of ``x x^T`` over calibration tokens.

    Groups stay contiguous along K (the layout ONNX Runtime reads). Without ``act_order`` a
    group's scale is fitted when its first column is reached, to the error-updated weights;
    with ``act_order`` (columns by decreasing Hessian diagonal) the group scales are fitted up
    front ("static groups"), since groups would otherwise be visited out of order. ``fixed``:
    given group scales and zero points ``(N, groups)`` (e.g. refitted ones) to round to.
    """
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    n, k = w.shape
    group = fmt.group(k)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    if fixed is not None:
        fixed = (fixed[0].float().clone(), fixed[1].float().clone())
    static = act_order or group == k or fixed is not None
    scale, zero = (
        fixed
        if fixed is not None
        else _params(w, fmt, group)
        if static
        else (torch.empty(n, -(-k // group), device=w.device), torch.empty(n, -(-k // group), device=w.device))
    )
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k, device=w.device)
    w, h = w[:, perm], h[perm][:, perm]
    hinv = _inverse_hessian_factor(h, damp)
    if _column_kernel(w):
        q = _gptq_kernel(w, hinv, scale, zero, perm, static, group, fmt, block)
        return quantize_weight(q[:, torch.argsort(perm)], fmt, scale, zero)
    q = torch.zeros_like(w)
    cols = perm.tolist()  # one host copy, not a device sync per column
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(n, i2 - i1, device=w.device), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = cols[i1 + i]
            g = col // group
            if not static and col % group == 0:
                upcoming = torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, :group]
                scale[:, g : g + 1], zero[:, g : g + 1] = _params(upcoming, fmt, group)
            column = w1[:, i]
            qc = fake_quantize(column, scale[:, g], zero[:, g], fmt.levels)
            q[:, i1 + i] = qc
            e = (column - qc) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    q = q[:, torch.argsort(perm)]
    return quantize_weight(q, fmt, scale, zero)


@torch.no_grad()
def refit_scales(
    weight: torch.Tensor, q: QuantizedWeight, hessian: torch.Tensor, ridge: float = 1e-6
) -> QuantizedWeight:
    """Keep the codes, re-solve each row's group scales for the least output error ``tr(E H E^T)``.

    With codes ``c`` (minus zero points) fixed, a row's output is linear in its group scales,
    so the best scales solve a small ``G x G`` system per row: ``A s = b`` with
    ``A_gh = c_g H c_h^T`` and ``b_g = c_g H w^T``. The scales GPTQ (or RTN) chose are one
    candidate, so the layer's calibration error can only fall. ``ridge`` (a fraction of the
    mean diagonal) pulls an all-zero group's scale to its old value.
    """
    n, k = weight.shape
    group = q.fmt.group(k)
    g_count = -(-k // group)
    kp = g_count * group
    codes = q.codes.float()[:, :k] - q.zeros.float().repeat_interleave(q.block_size, 1)[:, :k]
    c = pad_to_blocks(codes, group)  # (N, kp)
    h = torch.zeros(kp, kp, device=hessian.device)
    h[:k, :k] = hessian.float()
    w = pad_to_blocks(weight.float(), group)
    old = group_level(q)[0]
    a = torch.empty(n, g_count, g_count, device=c.device)
    # rows in chunks: the (rows, G, K) product is G times the weight (26 GB at once for an 8B
    # model's down_proj), a chunk of it stays near 256 MB
    step = max(1, (64 << 20) // (g_count * kp))
    for r in range(0, n, step):
        cr = c[r : r + step].view(-1, g_count, group)
        partial = torch.einsum("ngi,gij->ngj", cr, h.view(g_count, group, kp))
        a[r : r + step] = (partial.view(-1, g_count, g_count, group) * cr.view(-1, 1, g_count, group)).sum(-1)
    del partial
    b = (c.view(n, g_count, group) * (w @ h).view(n, g_count, group)).sum(-1)  # (N, G)
    lam = ridge * a.diagonal(dim1=1, dim2=2).mean(-1).clamp(min=1e-12)  # (N,)
    eye = torch.eye(g_count, device=hessian.device)
    scales = (
        torch.linalg.solve(
            a.double() + (lam[:, None, None] * eye).double(), (b + lam[:, None] * old).double().unsqueeze(-1)
        )
        .squeeze(-1)
        .float()
    )
    scales = q.fmt.round_scales(torch.where(torch.isfinite(scales), scales, old))
    if group == k:
        scales = scales.expand(n, q.scales.shape[1])
    return QuantizedWeight(q.codes, scales.contiguous(), q.zeros, q.fmt, q.in_features)


def group_level(q: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points per quantization group ``(N, groups)`` (storage may repeat them)."""
    if q.fmt.group(q.in_features) == q.in_features:
        return q.scales[:, :1], q.zeros[:, :1].float()
    return q.scales, q.zeros.float()


def _column_kernel(w: torch.Tensor) -> bool:
    """The Triton column loop on a GPU (``PRESSO_GPTQ_KERNEL=0`` keeps the torch loop)."""
    if not w.is_cuda or os.environ.get("PRESSO_GPTQ_KERNEL", "1") == "0":
        return False
    return importlib.util.find_spec("triton") is not None


def _gptq_kernel(w, hinv, scale, zero, perm, static: bool, group: int, fmt: WeightFormat, block: int):
    """The loop of :func:`gptq_quantize`, one Triton launch per block of columns. Without static
    groups the block is at most one group, so each group's scale is fitted at the start of a
    block, from the weights as the blocks before it left them (what the torch loop does)."""
    from presso.runtime.triton.gptq import quantize_columns

    n, k = w.shape
    width = block if static else min(block, group)
    groups = (perm // group).to(torch.int32)
    q = torch.empty_like(w)
    for i1 in range(0, k, width):
        i2 = min(i1 + width, k)
        if not static and i1 % group == 0:
            g = i1 // group
            scale[:, g : g + 1], zero[:, g : g + 1] = _params(w[:, i1 : i1 + group], fmt, group)
        err = quantize_columns(w[:, i1:i2], hinv[i1:i2, i1:i2], scale, zero, groups[i1:i2], fmt.levels, q[:, i1:i2])
        w[:, i2:] -= err @ hinv[i1:i2, i2:]
    return q
