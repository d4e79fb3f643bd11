"""``split_low_rank``: replace linears by two thin ones (in -> rank -> out) where that saves parameters.

Policy: which layers (``targets``/``skip`` globs) and which rank each gets: a fixed
``rank``, the ``energy`` of singular values kept, or a ``ratio`` of the selected layers'
parameters removed, spread ``uniform`` (the same fraction per layer) or by ``sensitivity``
(one threshold on every layer's relative truncation error, so layers that factor well give
more). Mechanism: :mod:`presso.passes.low_rank.factor` (``svd``, ``asvd``, ``whiten``). A layer
whose rank would not save parameters (r (m + n) >= m n) is left alone and reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from presso.errors import ConfigError
from presso.graph import Graph
from presso.pass_api import Context, Pass, PassConfig, PassResult
from presso.passes.common.blocks import group_by_input
from presso.passes.common.loss import output_gradient_grams
from presso.passes.common.modules import linear_weight, matches, select_linears, tied_to_others
from presso.passes.common.stats import calibration_input_stats
from presso.passes.low_rank.factor import (
    Spectrum,
    Unit,
    break_even,
    input_transform,
    rank_for_energy,
    replace_unit,
    spectrum,
)
from presso.passes.low_rank.sequential import factor_sequentially


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
    # linears that read the same tensor (gate and up, q/k/v) share one first factor: the same
    # parameters buy a higher rank (rank= then counts per shared factor)
    share_inputs: bool = True

    def validate(self) -> None:
        given = [n for n in ("ratio", "rank", "energy") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ConfigError(
                "give exactly one of ratio=, rank= or energy=",
                hint="e.g. split_low_rank(ratio=0.2, targets=('*mlp*',), method='whiten')",
            )
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

    @property
    def expected_drift(self) -> float:
        # removing a fraction r of the parameters (or of the energy) moves a random test model's outputs by about
        # sqrt(r) of their norm (uncorrelated loss of signal); the bound keeps 2.5x of that, so it
        # catches a blown-up model (outputs many times their norm) and not the cost it states
        r = self.ratio if self.ratio is not None else (1 - self.energy if self.energy is not None else 0.5)
        return 2.5 * max(r, 0.01) ** 0.5


class SplitLowRank(Pass):
    name = "split_low_rank"
    Config = SplitLowRankConfig
    summary = "Factor linears into two thin ones (SVD, activation-aware ASVD, or SVD-LLM whitening)."
    conflicts = {"quantized": "split_low_rank factors float linears: run it before the quantization passes"}

    @property
    def provides(self) -> frozenset[str]:
        return frozenset({"shared_factor"}) if self.config.share_inputs else frozenset()

    def run(self, graph: Graph, ctx: Context) -> PassResult:
        cfg = self.config
        chosen, _ = select_linears(graph, cfg.skip)
        chosen = {p: m for p, m in chosen.items() if matches(p, cfg.targets)}
        for path in tied_to_others(graph.module, chosen):
            chosen.pop(path)
        if not chosen:
            raise ConfigError(
                f"no linear matches targets {list(cfg.targets)} (minus skip {list(cfg.skip)})",
                hint="targets are glob patterns on module paths, e.g. '*mlp*' or 'model.layers.*.mlp.*'",
            )
        units = shared_input_units(graph, chosen) if cfg.share_inputs else [(p,) for p in chosen]
        shapes = {
            u: (sum(linear_weight(chosen[p])[0].shape[0] for p in u), linear_weight(chosen[u[0]])[0].shape[1])
            for u in units
        }
        weighted = cfg.method == "whiten" and cfg.weigh_outputs
        out_grams = output_gradient_grams(graph, ctx, chosen, "split_low_rank: output gradients") if weighted else {}
        spectra = self._spectra(graph, ctx, chosen, units, out_grams)
        ranks = self._ranks(shapes, spectra)
        done = {u: r for u, r in ranks.items() if r <= break_even(*shapes[u])}
        left = {
            p: f"rank {r} would not save parameters (break-even {break_even(*shapes[u])})"
            for u, r in ranks.items()
            if u not in done
            for p in u
        }
        fitted = set()
        if cfg.method == "whiten" and cfg.sequential:
            fitted = factor_sequentially(graph, list(ctx.calibration), done, out_grams)
        for unit in done.keys() - fitted:  # one-shot: outside the repeated blocks, or not sequential
            replace_unit(graph.module, list(unit), *spectra[unit].factors(ranks[unit]))
        before = sum(m * n for m, n in shapes.values())
        after = sum(r * sum(shapes[u]) for u, r in done.items()) + sum(
            m * n for u, (m, n) in shapes.items() if u not in done
        )
        return PassResult(
            graph,
            bool(done),
            {
                "factored": {p: r for u, r in done.items() for p in u},
                "left_alone": left,
                "method": cfg.method,
                "sharing_first_factor": [list(u) for u in done if len(u) > 1],
                "fitted_sequentially": sum(len(u) for u in fitted),
                "params_removed_in_selected": 1 - after / before,
            },
        )

    def _spectra(
        self,
        graph: Graph,
        ctx: Context,
        chosen: dict[str, nn.Module],
        units: list[Unit],
        out_grams: dict[str, torch.Tensor],
    ) -> dict[Unit, Spectrum]:
        method = self.config.method
        stats = None
        firsts = {u[0]: chosen[u[0]] for u in units}  # a unit's members read the same inputs
        if method != "svd":
            stats = calibration_input_stats(
                graph,
                ctx,
                firsts,
                grams=firsts if method == "whiten" else (),
                desc=f"split_low_rank: {method} statistics",
            )
        out = {}
        for unit in units:
            w = torch.cat([linear_weight(chosen[p])[0] for p in unit])
            first = unit[0]
            s = stats.get(first) if stats else None
            m, m_inv = input_transform(method, w.shape[1], s and s.gram, s and s.sq, s.rows if s else 1)
            out[unit] = spectrum(w, m, m_inv, [out_grams[p] for p in unit] if out_grams else None)
        return out

    def _ranks(self, shapes: dict[Unit, tuple[int, int]], spectra: dict[Unit, Spectrum]) -> dict[Unit, int]:
        cfg = self.config
        if cfg.rank is not None:
            return {u: cfg.rank for u in shapes}
        if cfg.energy is not None:
            return {u: _round_up(rank_for_energy(spectra[u].s, cfg.energy), cfg.round_to) for u in shapes}
        if cfg.allocate == "uniform":
            return {
                u: max(cfg.round_to, _round_down(round((1 - cfg.ratio) * m * n / (m + n)), cfg.round_to))
                for u, (m, n) in shapes.items()
            }
        return sensitivity_ranks(spectra, shapes, cfg.ratio, cfg.round_to)


def shared_input_units(graph: Graph, chosen: dict[str, nn.Module]) -> list[Unit]:
    """Sibling linears that read the same tensor (gate/up, q/k/v) as one unit; the others alone."""
    units = []
    for group in group_by_input(chosen, graph.run):
        by_parent: dict[str, list[str]] = {}
        for path in group:
            by_parent.setdefault(path.rpartition(".")[0], []).append(path)
        units += [tuple(paths) for paths in by_parent.values()]
    return units


def _round_up(r: int, step: int) -> int:
    return -(-r // step) * step


def _round_down(r: int, step: int) -> int:
    return max(step, r // step * step)


def sensitivity_ranks(
    spectra: dict[str, Spectrum], shapes: dict[str, tuple[int, int]], ratio: float, round_to: int
) -> dict[str, int]:
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
