"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's
rounding error onto the columns not yet quantized, weighted by the inverse Hessian of the
layer's inputs, so the layer's output on calibration data moves as little as possible.
"""
from __future__ import annotations

import torch

from presso.runtime.quant import QuantizedWeight, WeightFormat, fake_quantize, group_params, pad_to_blocks, quantize_weight


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``, more damping if needed."""
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    base = damp * torch.diag(h).mean().clamp(min=1e-8)
    for attempt in range(6):
        try:
            lower = torch.linalg.cholesky(h + base * (10 ** attempt) * eye)
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise torch.linalg.LinAlgError("the calibration Hessian stays singular after damping")


def _params(w: torch.Tensor, fmt: WeightFormat, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group scale/zero ``(N, G)`` from ``w`` ``(N, G*group)`` (zero-padded if ragged)."""
    n = w.shape[0]
    return group_params(pad_to_blocks(w, group).view(n, -1, group), fmt)


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, fmt: WeightFormat, *, damp: float = 0.01,
                  act_order: bool = False, block: int = 128) -> QuantizedWeight:
    """``weight`` ``(N, K)``, ``hessian`` ``(K, K)`` = mean of ``x x^T`` over calibration tokens.

    Groups stay contiguous along K (the layout ONNX Runtime reads). Without ``act_order`` a
    group's scale is fitted when its first column is reached, to the error-updated weights;
    with ``act_order`` (columns by decreasing Hessian diagonal) the group scales are fitted up
    front ("static groups"), since groups would otherwise be visited out of order.
    """
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    n, k = w.shape
    group = fmt.group(k)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    static = act_order or group == k
    scale, zero = _params(w, fmt, group) if static else (torch.empty(n, -(-k // group)), torch.empty(n, -(-k // group)))
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    hinv = _inverse_hessian_factor(h, damp)
    q = torch.zeros_like(w)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(n, i2 - i1), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            g = col // group
            if not static and col % group == 0:
                upcoming = torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, :group]
                scale[:, g:g + 1], zero[:, g:g + 1] = _params(upcoming, fmt, group)
            column = w1[:, i]
            qc = fake_quantize(column, scale[:, g], zero[:, g], fmt.levels)
            q[:, i1 + i] = qc
            e = (column - qc) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    q = q[:, torch.argsort(perm)]
    return quantize_weight(q, fmt, scale, zero)
