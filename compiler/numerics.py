"""Output comparisons shared by the pass manager, the tests and ``presso.testing``."""
from __future__ import annotations

from typing import Sequence

import torch


def rel_error(got: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> float:
    """Worst relative L2 error over outputs: ``||got - ref|| / ||ref||`` (0 when both are 0)."""
    worst = 0.0
    for g, r in zip(got, ref, strict=True):
        g, r = torch.as_tensor(g).double(), torch.as_tensor(r).double()
        denom = r.norm().item()
        num = (g - r).norm().item()
        worst = max(worst, num / denom if denom > 0 else num)
    return worst


def max_abs_error(got: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> float:
    return max(((torch.as_tensor(g).double() - torch.as_tensor(r).double()).abs().max().item()
                for g, r in zip(got, ref, strict=True)), default=0.0)


def non_finite(outputs: Sequence[torch.Tensor]) -> list[int]:
    """Indices of floating outputs that hold a NaN or an Inf."""
    return [i for i, t in enumerate(outputs) if t.is_floating_point() and not torch.isfinite(t).all()]
