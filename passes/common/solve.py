"""Damped solves on calibration Gram matrices, with one damping rule.

The rule: add ``damp`` times the mean of the diagonal to the diagonal. It scales with the
data, so one fraction works for any layer width or activation scale. ``REFIT_DAMP`` is a
ridge prior for weights refit by least squares (few calibration rows per input channel make
the plain solution fit noise); ``PD_DAMP`` only makes a Gram matrix safely positive definite
for a Cholesky factor, where more damping would bias a whitening transform.
"""
from __future__ import annotations

import torch

REFIT_DAMP = 0.01
PD_DAMP = 1e-4


def damped(gram: torch.Tensor, damp: float = REFIT_DAMP) -> torch.Tensor:
    """``gram`` in float64 plus ``damp`` times its mean diagonal on the diagonal."""
    g = gram.double()
    return g + torch.eye(g.shape[0], dtype=g.dtype, device=g.device) * damp * g.diagonal().mean().clamp(min=1e-12)


def refit(weight: torch.Tensor, cross: torch.Tensor, gram: torch.Tensor, damp: float = REFIT_DAMP) -> torch.Tensor:
    """The weight ``W'`` minimising ``||W H - W' H'||^2``: ``W (H^T H') (H'^T H' + damp)^-1``, float64.

    ``cross = H^T H'`` and ``gram = H'^T H'`` over calibration rows; with ``H = H'`` restricted
    to kept channels this is the refit after pruning.
    """
    rhs = weight.double() @ cross.double()
    return torch.linalg.solve(damped(gram, damp), rhs.t()).t()


def damped_cholesky(gram: torch.Tensor, damp: float = PD_DAMP) -> torch.Tensor:
    """Lower Cholesky factor of the damped ``gram``."""
    return torch.linalg.cholesky(damped(gram, damp))
