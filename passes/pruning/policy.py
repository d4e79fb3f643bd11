"""Which units to keep: per-group counts from a ratio, by layer (``uniform``) or globally.

``params_ratio`` is met by bisection on the unit ratio, counting the parameters left
exactly (with the masks the mechanism would apply). ``round_to`` keeps each cut
dimension's width a multiple of it (a head counts ``head_dim`` elements).
"""
from __future__ import annotations

import math

import torch

from presso.passes.common.dep_groups import DepGraph, DepGroup
from presso.passes.pruning.apply import keep_masks, kept_numel


def unit_width(group: DepGroup, dep: DepGraph) -> int:
    """Elements one unit spans in its widest member dimension (head_dim for a head)."""
    widths = [int((m.units == 0).sum()) for m in group.members]
    return max(widths) if widths else 1


def step_of(group: DepGroup, dep: DepGraph, round_to: int) -> int:
    width = unit_width(group, dep)
    return round_to // math.gcd(round_to, width)


def keep_top(scores: torch.Tensor, n_keep: int, per_block: int = 1) -> torch.Tensor:
    """Mask of the ``n_keep`` best units; with blocks (GQA), the same count in every block."""
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    if per_block == 1:
        keep[scores.argsort(descending=True)[:n_keep]] = True
        return keep
    blocks = scores.view(-1, per_block)
    per = max(1, n_keep // blocks.shape[0])
    top = blocks.argsort(dim=1, descending=True)[:, :per]
    keep.view(-1, per_block).scatter_(1, top, True)
    return keep


def _count(n: int, ratio: float, step: int, per_block: int) -> int:
    if per_block > 1:  # whole units per block, at least one
        per = min(per_block, max(1, round(per_block * (1 - ratio))))
        return per * (n // per_block)
    k = round(n * (1 - ratio) / step) * step
    return min(n, max(step, k))


def uniform(groups: list[DepGroup], scores: dict[str, torch.Tensor], ratio: float, dep: DepGraph,
            round_to: int) -> dict[str, torch.Tensor]:
    out = {}
    for g in groups:
        k = _count(g.size, ratio, step_of(g, dep, round_to), g.per_block)
        out[g.name] = keep_top(scores[g.name], k, g.per_block)
    return out


def global_rank(groups: list[DepGroup], scores: dict[str, torch.Tensor], ratio: float, dep: DepGraph,
                round_to: int) -> dict[str, torch.Tensor]:
    """Per family, one threshold over all units (each group's scores normalised by their mean)."""
    out = {}
    for family in {g.family for g in groups}:
        members = [g for g in groups if g.family == family]
        norm = {g.name: scores[g.name] / scores[g.name].mean().clamp(min=1e-12) for g in members}
        pooled = torch.cat(list(norm.values()))
        cut = int(pooled.numel() * ratio)
        threshold = pooled.sort().values[cut - 1] if cut > 0 else -math.inf
        for g in members:
            kept = int((norm[g.name] > threshold).sum())
            k = _count(g.size, 1 - kept / g.size, step_of(g, dep, round_to), g.per_block)
            out[g.name] = keep_top(scores[g.name], k, g.per_block)
    return out


SCOPES = {"uniform": uniform, "global": global_rank}


def decide(groups, scores, dep: DepGraph, *, scope: str, round_to: int, ratio: float | None = None,
           params_ratio: float | None = None, total_params: int = 0) -> tuple[dict[str, torch.Tensor], float]:
    """Keep masks per group, and the unit ratio used (found by bisection for ``params_ratio``)."""
    choose = SCOPES[scope]
    if ratio is not None:
        return choose(groups, scores, ratio, dep, round_to), ratio
    full = kept_numel(dep, {})

    def removed(r: float) -> float:
        return (full - kept_numel(dep, keep_masks(dep, choose(groups, scores, r, dep, round_to)))) / total_params

    lo, hi = 0.0, 0.99
    best = (abs(removed(hi) - params_ratio), hi)
    for _ in range(24):
        mid = (lo + hi) / 2
        got = removed(mid)
        best = min(best, (abs(got - params_ratio), mid))
        lo, hi = (mid, hi) if got < params_ratio else (lo, mid)
    return choose(groups, scores, best[1], dep, round_to), best[1]
