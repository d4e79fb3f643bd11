"""Low-rank factorizations of a linear weight ``W`` (out x in): the mechanism of ``split_low_rank``.

Each method factors ``W M`` for a method-specific input transform ``M`` and undoes ``M`` in
the first factor, so that dropping singular value ``s_i`` costs ``s_i^2`` in a meaningful norm:

* ``svd``: ``M = I``, the weight's own Frobenius error.
* ``asvd``: ``M = diag(rms(x_j) ** 0.5)``, input channels weighted by their activation scale
  (ASVD, Yuan et al. 2023).
* ``whiten``: ``M = L`` with ``L L^T = X^T X`` over calibration inputs (SVD-LLM, Wang et al.
  2024): ``s_i^2`` is exactly the output error on the calibration data, so truncation is
  optimal for it.

``W ~= B A`` with ``A = S_r^(1/2) V_r^T M^-1`` (rank x in) and ``B = U_r S_r^(1/2)`` (out x rank).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from presso.passes.common.modules import linear_weight
from presso.passes.common.solve import PD_DAMP, damped_cholesky

ASVD_ALPHA = 0.5
# of the mean diagonal, added to an output-weight Gram matrix: K-FAC gradient Grams from a few
# thousand tokens are noisy, and a weight of the same order as the noise keeps each layer's
# scale (what the sensitivity allocation compares) while trusting its cross terms less.
# On SmolLM2 (20% of the MLP, 32 calibration sequences) 1 beat 1e-4 to 10 by 1-5% in perplexity.
OUT_DAMP = 1.0

Unit = tuple[str, ...]  # paths of linears factored together: one, or several sharing one first factor


@dataclass
class Spectrum:
    """The SVD of ``W M``, kept until the rank is chosen."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    m_inv: torch.Tensor | None  # None: the identity
    out_inv: torch.Tensor | None = None  # undoes an output weighting (None: none)

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        root = self.s[:rank].sqrt()
        a = root[:, None] * self.vh[:rank]
        if self.m_inv is not None:
            a = a @ self.m_inv
        b = self.u[:, :rank] * root[None, :]
        if self.out_inv is not None:
            b = self.out_inv @ b
        return a.float(), b.float()


def input_transform(method: str, n: int, gram: torch.Tensor | None, sq: torch.Tensor | None,
                    rows: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(M, M^-1) for a method, from the input Gram matrix or the per-channel sum of squares."""
    if method == "svd":
        return None, None
    if method == "asvd":
        scale = (sq.double() / max(rows, 1)).sqrt().clamp(min=1e-6) ** ASVD_ALPHA
        return torch.diag(scale), torch.diag(1.0 / scale)
    lower = damped_cholesky(gram, PD_DAMP)
    eye = torch.eye(n, dtype=lower.dtype, device=lower.device)
    return lower, torch.linalg.solve_triangular(lower, eye, upper=False)


def spectrum(weight: torch.Tensor, m: torch.Tensor | None, m_inv: torch.Tensor | None,
             out_grams: list[torch.Tensor] | None = None) -> Spectrum:
    """The SVD of ``W M``, or of ``R^T W M`` with ``R R^T = out_gram`` when the output error is
    weighted (``out_grams``: how much each pair of outputs matters downstream, one matrix per
    block of rows of ``W``: the members of a group stacked to share one first factor)."""
    w = weight.double()
    w = w if m is None else w @ m
    out_inv = None
    if out_grams is not None:
        # each damped by its own scale; statistics of the whole model may sit on another device
        r = torch.block_diag(*(damped_cholesky(g.to(w.device), OUT_DAMP) for g in out_grams))
        w = r.t() @ w
        eye = torch.eye(r.shape[0], dtype=r.dtype, device=r.device)
        out_inv = torch.linalg.solve_triangular(r.t(), eye, upper=True)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return Spectrum(u, s, vh, m_inv, out_inv)


def break_even(out_features: int, in_features: int) -> int:
    """The largest rank that still saves parameters: r (m + n) < m n."""
    return (out_features * in_features - 1) // (out_features + in_features)


def rank_for_energy(s: torch.Tensor, energy: float) -> int:
    cum = (s ** 2).cumsum(0) / (s ** 2).sum().clamp(min=1e-30)
    return int((cum < energy).sum()) + 1


class LowRankLinear(nn.Sequential):
    """``first`` (in -> rank, no bias) then ``second`` (rank -> out, with the original bias).

    Linears that read the same tensor (gate and up, q/k/v) may hold one ``first`` module
    between them: one set of parameters, and one product in the exported ONNX graph (the
    export merges the repeated MatMul).
    """

    def __init__(self, first: nn.Linear, second: nn.Linear):
        super().__init__(OrderedDict(first=first, second=second))

    # read from the factors, so that they stay right when a later pass resizes those
    in_features = property(lambda self: self.first.in_features)
    out_features = property(lambda self: self.second.out_features)
    rank = property(lambda self: self.first.out_features)


def low_rank_linears(a: torch.Tensor, b: torch.Tensor, biases: list[torch.Tensor | None],
                     sizes: list[int], dtype: torch.dtype) -> list[LowRankLinear]:
    """One :class:`LowRankLinear` per block of ``sizes`` rows of ``B``, all sharing ``first`` = ``A``;
    the factors in ``dtype`` (the model's), whatever precision they were computed in."""
    first = _linear(a, None, dtype)
    return [LowRankLinear(first, _linear(part, bias, dtype)) for part, bias in zip(b.split(sizes), biases)]


def replace_unit(root: nn.Module, paths: list[str], a: torch.Tensor, b: torch.Tensor) -> None:
    """Put ``B A`` (the factors of the linears at ``paths``, weights stacked) in their place."""
    olds = [linear_weight(root.get_submodule(p)) for p in paths]
    news = low_rank_linears(a, b, [bias for _, bias in olds], [w.shape[0] for w, _ in olds], olds[0][0].dtype)
    for path, new in zip(paths, news):
        root.set_submodule(path, new)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=dtype, device=weight.device)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear
