"""``split_low_rank``: replace linears by two thin ones (in -> rank -> out) where that saves parameters.

Policy: which layers (``targets``/``skip`` globs) and which rank each gets: a fixed
``rank``, the ``energy`` of singular values kept, or a ``ratio`` of the selected layers'
parameters removed, spread ``uniform`` (the same fraction per layer) or by ``sensitivity``
(one threshold on every layer's relative truncation error, so layers that factor well give
more). Mechanism: :mod:`presso.passes.low_rank` (``svd``, ``asvd``, ``whiten``). A layer
whose rank would not save parameters (r (m + n) >= m n) is left alone and reported.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from presso.errors import ConfigError
from presso.graph import Graph
from presso.pass_api import Context, Pass, PassConfig, PassResult
from presso.passes.common import linear_weight, matches
from presso.passes.low_rank import (LowRankLinear, Spectrum, break_even, input_transform, rank_for_energy,
                                    spectrum)
from presso.passes.low_rank_sequential import factor_sequentially
from presso.passes.prune_stats import output_gradient_grams, record_inputs
from presso.passes.quantize_dynamic_int8 import select_linears, tied_to_others


@dataclass(frozen=True, kw_only=True)
class SplitLowRankConfig(PassConfig):
    ratio: float | None = None  # fraction of the selected layers' parameters removed
    rank: int | None = None  # or: this rank for every selected layer
    energy: float | None = None  # or: keep this fraction of each layer's squared singular values
    method: Literal["svd", "asvd", "whiten"] = "whiten"
    targets: tuple[str, ...] = ("*",)  # glob patterns on module paths, e.g. "*mlp*"
    skip: tuple[str, ...] = ("lm_head",)
    allocate: Literal["uniform", "sensitivity"] = "uniform"
    round_to: int = 1  # ranks are multiples of this
    # whiten: blocks in order on the factored model's inputs, each linear fit to the original's output
    sequential: bool = True
    # whiten: weigh each linear's output error by the calibration loss's sensitivity to it (K-FAC)
    weigh_outputs: bool = True

    def validate(self) -> None:
        given = [n for n in ("ratio", "rank", "energy") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ConfigError("give exactly one of ratio=, rank= or energy=",
                              hint="e.g. split_low_rank(ratio=0.2, targets=('*mlp*',), method='whiten')")
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise ConfigError(f"ratio {self.ratio} must be in (0, 1)")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise ConfigError(f"energy {self.energy} must be in (0, 1]")
        if self.rank is not None and self.rank < 1 or self.round_to < 1:
            raise ConfigError("rank and round_to must be >= 1")
        if self.allocate == "sensitivity" and self.ratio is None:
            raise ConfigError("allocate='sensitivity' spreads a ratio= budget", hint="give ratio=")

    @property
    def needs_calibration(self) -> bool:
        return self.method != "svd"


class SplitLowRank(Pass):
    name = "split_low_rank"
    Config = SplitLowRankConfig
    summary = "Factor linears into two thin ones (SVD, activation-aware ASVD, or SVD-LLM whitening)."
    provides = frozenset({"low_rank"})
    invalidates = frozenset({"quantized"})
    max_rel_error = 4.0  # lossy by design (perplexity measures the cost); this catches a blown-up model


    def run(self, graph: Graph, ctx: Context) -> PassResult:
        cfg = self.config
        chosen, _ = select_linears(graph, cfg.skip)
        chosen = {p: m for p, m in chosen.items() if matches(p, cfg.targets)}
        for path in tied_to_others(graph.module, chosen):
            chosen.pop(path)
        if not chosen:
            raise ConfigError(f"no linear matches targets {list(cfg.targets)} (minus skip {list(cfg.skip)})",
                              hint="targets are glob patterns on module paths, e.g. '*mlp*' or 'model.layers.*.mlp.*'")
        weighted = cfg.method == "whiten" and cfg.weigh_outputs
        out_grams = output_gradient_grams(graph, ctx, chosen, "split_low_rank: output gradients") if weighted else {}
        spectra = self._spectra(graph, ctx, chosen, out_grams)
        ranks = self._ranks(chosen, spectra)
        done, left = {}, {}
        for path, module in chosen.items():
            m, n = linear_weight(module)[0].shape
            if ranks[path] > break_even(m, n):
                left[path] = f"rank {ranks[path]} would not save parameters (break-even {break_even(m, n)})"
            else:
                done[path] = ranks[path]
        fitted = {}
        if cfg.method == "whiten" and cfg.sequential:
            fitted = factor_sequentially(graph, list(ctx.calibration), done, out_grams)
        for path in done:
            if path not in fitted:  # one-shot: outside the repeated blocks, or not sequential
                a, b = spectra[path].factors(ranks[path])
                graph.module.set_submodule(path, LowRankLinear(a, b, linear_weight(chosen[path])[1]))
        before = sum(math.prod(linear_weight(m)[0].shape) for m in chosen.values())
        after = sum(r * sum(linear_weight(chosen[p])[0].shape) for p, r in done.items()) + \
            sum(math.prod(linear_weight(chosen[p])[0].shape) for p in left)
        return PassResult(graph, bool(done), {"factored": done, "left_alone": left, "method": cfg.method,
                                              "fitted_sequentially": len(fitted),
                                              "params_removed_in_selected": 1 - after / before})

    def _spectra(self, graph: Graph, ctx: Context, chosen: dict[str, nn.Module],
                 out_grams: dict[str, torch.Tensor]) -> dict[str, Spectrum]:
        method = self.config.method
        stats = None
        if method != "svd":
            stats = record_inputs(graph, ctx, chosen, grams=set(chosen) if method == "whiten" else set(),
                                  desc=f"split_low_rank: {method} statistics")
        out = {}
        for path, module in chosen.items():
            w = linear_weight(module)[0]
            m, m_inv = input_transform(method, w.shape[1], stats and stats.gram.get(path),
                                       stats and stats.sq.get(path), stats.rows.get(path, 1) if stats else 1)
            out[path] = spectrum(w, m, m_inv, out_grams.get(path))
        return out

    def _ranks(self, chosen: dict[str, nn.Module], spectra: dict[str, Spectrum]) -> dict[str, int]:
        cfg = self.config
        shapes = {p: tuple(linear_weight(m)[0].shape) for p, m in chosen.items()}
        if cfg.rank is not None:
            return {p: cfg.rank for p in chosen}
        if cfg.energy is not None:
            return {p: _round_up(rank_for_energy(spectra[p].s, cfg.energy), cfg.round_to) for p in chosen}
        if cfg.allocate == "uniform":
            return {p: max(cfg.round_to, _round_down(round((1 - cfg.ratio) * m * n / (m + n)), cfg.round_to))
                    for p, (m, n) in shapes.items()}
        return sensitivity_ranks(spectra, shapes, cfg.ratio, cfg.round_to)


def _round_up(r: int, step: int) -> int:
    return -(-r // step) * step


def _round_down(r: int, step: int) -> int:
    return max(step, r // step * step)


def sensitivity_ranks(spectra: dict[str, Spectrum], shapes: dict[str, tuple[int, int]], ratio: float,
                      round_to: int) -> dict[str, int]:
    """Keep the directions worth most per parameter across all layers until the budget is spent.

    Direction ``i`` of a layer costs ``m + n`` parameters and dropping it costs ``s_i^2`` in
    the method's norm: with whitening and ``weigh_outputs`` that is an estimate of the
    calibration loss it adds (K-FAC), so one greedy pass spends the budget where the loss
    is least hurt. A layer that reaches its break-even rank stays whole.
    """
    budget = (1 - ratio) * sum(m * n for m, n in shapes.values())
    ranks = {p: round_to for p in shapes}
    used = sum(round_to * (m + n) for m, n in shapes.values())
    order = [(float(v) ** 2 / sum(shapes[p]), p) for p, sp in spectra.items() for v in sp.s[round_to:]]
    for _, p in sorted(order, key=lambda t: -t[0]):
        m, n = shapes[p]
        if ranks[p] > break_even(m, n):
            continue  # already whole
        cost = m * n - ranks[p] * (m + n) if ranks[p] == break_even(m, n) else m + n
        if used + cost > budget:
            break
        ranks[p] += 1
        used += cost
    return {p: r if r > break_even(*shapes[p]) else _round_down(r, round_to) for p, r in ranks.items()}
