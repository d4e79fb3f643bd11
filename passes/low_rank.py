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

from dataclasses import dataclass

import torch

ASVD_ALPHA = 0.5
DAMP = 1e-4  # of the mean diagonal, so that X^T X is positive definite


@dataclass
class Spectrum:
    """The SVD of ``W M``, kept until the rank is chosen."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    m_inv: torch.Tensor | None  # None: the identity

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        root = self.s[:rank].sqrt()
        a = root[:, None] * self.vh[:rank]
        if self.m_inv is not None:
            a = a @ self.m_inv
        return a.float(), (self.u[:, :rank] * root[None, :]).float()


def input_transform(method: str, n: int, gram: torch.Tensor | None, sq: torch.Tensor | None,
                    rows: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(M, M^-1) for a method, from the input Gram matrix or the per-channel sum of squares."""
    if method == "svd":
        return None, None
    if method == "asvd":
        scale = (sq.double() / max(rows, 1)).sqrt().clamp(min=1e-6) ** ASVD_ALPHA
        return torch.diag(scale), torch.diag(1.0 / scale)
    g = gram.double()
    g = g + torch.eye(n, dtype=g.dtype) * DAMP * g.diagonal().mean().clamp(min=1e-12)
    lower = torch.linalg.cholesky(g)
    return lower, torch.linalg.solve_triangular(lower, torch.eye(n, dtype=g.dtype), upper=False)


def spectrum(weight: torch.Tensor, m: torch.Tensor | None, m_inv: torch.Tensor | None) -> Spectrum:
    w = weight.double()
    u, s, vh = torch.linalg.svd(w if m is None else w @ m, full_matrices=False)
    return Spectrum(u, s, vh, m_inv)


def break_even(out_features: int, in_features: int) -> int:
    """The largest rank that still saves parameters: r (m + n) < m n."""
    return (out_features * in_features - 1) // (out_features + in_features)


def rank_for_energy(s: torch.Tensor, energy: float) -> int:
    cum = (s ** 2).cumsum(0) / (s ** 2).sum().clamp(min=1e-30)
    return int((cum < energy).sum()) + 1
