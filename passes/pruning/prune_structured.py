"""``prune_structured``: remove attention heads, kv heads, MLP neurons, channels or hidden size.

Steps: dependency groups from the traced graph (:mod:`.dep_groups`), scores from an
importance (:mod:`.importance`, pluggable), keep masks from a ratio or a parameter budget
(:mod:`.prune_policy`), one cut of every coupled slice plus module and config updates
(:mod:`.prune_apply`), then optionally ``recover``: every linear whose inputs lost
channels is refit by least squares to reproduce its original output from the channels
left, on calibration activations (:mod:`.prune_recover`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from torch import nn

from presso.errors import ConfigError
from presso.graph import Graph
from presso.pass_api import Context, Pass, PassConfig, PassResult
from presso.passes.common.dep_groups import FAMILIES, DepGraph, DepGroup, build_dep_graph
from presso.passes.common.loss import calibration_loss, parameter_gradients
from presso.passes.common.modules import is_linear, matches
from presso.passes.common.stats import calibration_input_stats
from presso.passes.pruning import policy as prune_policy
from presso.passes.pruning import recover as prune_recover
from presso.passes.pruning.apply import apply_masks, can_resize, keep_masks, update_config
from presso.passes.pruning.importance import Evidence
from presso.plugins.registry import get_registry
from presso.report import count_params


@dataclass(frozen=True, kw_only=True)
class PruneStructuredConfig(PassConfig):
    target: tuple[str, ...] = ("mlp",)  # any of heads, kv_heads, mlp, channels, hidden
    ratio: float | None = None  # fraction of the targeted units removed
    params_ratio: float | None = None  # or: fraction of the model's parameters removed
    importance: str = "magnitude"  # a registered importance (presso.list_importances())
    aggregate: Literal["sum", "mean", "max"] = "sum"  # over the parameters of a group
    scope: Literal["uniform", "global"] = "uniform"  # the same ratio in every layer, or one ranking
    protect: tuple[str, ...] = ()  # glob patterns: groups touching these modules stay whole
    round_to: int = 1  # keep cut widths multiples of this (8, 16, 64 for fast kernels)
    recover: bool = False  # least-squares refit of the layers after the cut, on calibration data

    def validate(self) -> None:
        unknown = sorted(set(self.target) - set(FAMILIES))
        if unknown or not self.target:
            raise ConfigError(
                f"unknown prune target(s) {unknown or '(none)'}", hint=f"use any of {', '.join(FAMILIES)}"
            )
        if (self.ratio is None) == (self.params_ratio is None):
            raise ConfigError(
                "give exactly one of ratio= (units) or params_ratio= (model parameters)",
                hint="e.g. prune_structured(target=('heads', 'mlp'), params_ratio=0.2)",
            )
        r = self.ratio if self.ratio is not None else self.params_ratio
        if not 0 < r < 1:
            raise ConfigError(f"ratio {r} must be in (0, 1)", hint="0.2 removes a fifth")
        if self.round_to < 1:
            raise ConfigError(f"round_to={self.round_to} must be >= 1")
        known = get_registry().importances
        if self.importance not in known:
            raise ConfigError(f"unknown importance {self.importance!r}", hint=f"available: {', '.join(sorted(known))}")

    @property
    def expected_drift(self) -> float:
        # cutting a fraction r of the units moves a random test model's outputs by about
        # sqrt(r) of their norm (uncorrelated loss of signal); the bound keeps 2.5x of that, so it
        # catches a blown-up model (outputs many times their norm) and not the cost it states
        r = self.ratio if self.ratio is not None else self.params_ratio
        return 2.5 * r**0.5

    @property
    def needs(self) -> frozenset[str]:
        return get_registry().importances[self.importance].needs

    @property
    def needs_calibration(self) -> bool:
        return self.recover or bool(self.needs)


class PruneStructured(Pass):
    name = "prune_structured"
    Config = PruneStructuredConfig
    summary = "Structured pruning over dependency groups: heads, kv heads, MLP neurons, channels, hidden size."
    conflicts = {"quantized": "prune_structured cuts float linears: run it before the quantization passes",
                 "shared_factor": "prune_structured cannot yet cut a factor shared by several linears: run it "
                                  "before split_low_rank, or split with share_inputs=False"}

    def run(self, graph: Graph, ctx: Context) -> PassResult:
        cfg = self.config
        shared = shared_linears(graph.module)
        if shared:
            raise ConfigError(
                "prune_structured cannot yet cut a linear held at several paths: " + " and ".join(shared[0]),
                hint="run prune_structured before split_low_rank, or split with share_inputs=False",
            )
        dep = build_dep_graph(graph)
        groups, skipped = self._select(graph, dep)
        if not groups:
            raise ConfigError(
                f"nothing to prune for target {list(self.config.target)} in {type(graph.module).__name__}"
                + (f": {skipped}" if skipped else ""),
                hint="prunable here: "
                + (", ".join(sorted({g.family for g in dep.groups})) or "none")
                + "; left alone: "
                + "; ".join(f"{r} ({n} dims)" for r, n in _frozen_summary(dep).items()),
            )
        scores = self._scores(graph, ctx, dep, groups)
        total = count_params(graph.module)
        decisions, unit_ratio = prune_policy.decide(
            groups,
            scores,
            dep,
            scope=cfg.scope,
            round_to=cfg.round_to,
            ratio=cfg.ratio,
            params_ratio=cfg.params_ratio,
            total_params=total,
        )
        masks = keep_masks(dep, decisions)
        refit = prune_recover.prepare(graph, ctx, masks) if cfg.recover else None
        apply_masks(graph.module, dep, masks)
        stats = {
            "groups": len(groups),
            "unit_ratio": round(unit_ratio, 4),
            "params_before": total,
            "params_after": count_params(graph.module),
            "skipped": skipped,
            "frozen": _frozen_summary(dep),
            "removed": _removed_units(groups, decisions),
        }
        stats["params_removed"] = 1 - stats["params_after"] / total
        stats["config"] = update_config(graph.module, _widths(dep.by_family(*cfg.target), decisions))
        if refit is not None:
            graph.invalidate()
            stats["calibration_loss_before_recovery"] = calibration_loss(graph, ctx)
            stats["recovered_layers"] = refit.apply(graph.module)
            stats["calibration_loss_after_recovery"] = calibration_loss(graph, ctx)
        return PassResult(graph, True, stats)

    def _select(self, graph: Graph, dep: DepGraph) -> tuple[list[DepGroup], dict[str, str]]:
        chosen, skipped = [], {}
        families = set(self.config.target)
        if "kv_heads" in families and not dep.by_family("kv_heads"):
            families.add("heads")  # multi-head attention: every head is its own kv head
        for g in dep.by_family(*families):
            blocker = next((m for m in g.modules if not can_resize(graph.module.get_submodule(m), g.size)), None)
            if any(matches(m, self.config.protect) for m in g.modules):
                skipped[g.name] = "protected"
            elif blocker is not None:
                skipped[g.name] = f"{type(graph.module.get_submodule(blocker)).__name__} {blocker!r} cannot be resized"
            else:
                chosen.append(g)
        return chosen, skipped

    def _scores(self, graph: Graph, ctx: Context, dep: DepGraph, groups: list[DepGroup]):
        importance = get_registry().importances[self.config.importance]()
        owners = {
            name: graph.module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else graph.module
            for name in dep.params
        }
        ev = Evidence(dep.params, owners)
        if "gradients" in importance.needs:
            ev.grads = parameter_gradients(graph, ctx, desc="prune_structured: gradients")
        if "activations" in importance.needs:
            stats = calibration_input_stats(
                graph, ctx, prunable_inputs(graph.module), desc="prune_structured: activations"
            )
            ev.input_sq = {p: s.sq for p, s in stats.items()}
        return {g.name: importance.score(g, ev, self.config.aggregate) for g in groups}


def _frozen_summary(dep: DepGraph) -> dict[str, int]:
    """Why dimensions were left alone, with how many parameter dimensions each reason holds."""
    counts: dict[str, int] = {}
    for reason in dep.frozen.values():
        reason = re.sub(r" \([^()]*\)$", "", reason)  # drop the node name
        counts[reason] = counts.get(reason, 0) + 1
    return counts


def _removed_units(groups: list[DepGroup], decisions) -> dict[str, str]:
    by_family: dict[str, list[int]] = {}
    for g in groups:
        kept = int(decisions[g.name].sum())
        total = by_family.setdefault(g.family, [0, 0])
        total[0] += g.size - kept
        total[1] += g.size
    return {f: f"{a}/{b}" for f, (a, b) in by_family.items()}


def _widths(groups: list[DepGroup], decisions) -> dict[str, set[int]]:
    """Each family's widths after the cut, groups left whole (protected, skipped) included."""
    widths: dict[str, set[int]] = {}
    for g in groups:
        kept = int(decisions[g.name].sum()) if g.name in decisions else g.size
        widths.setdefault(g.family, set()).add(kept)
    return widths


def shared_linears(root: nn.Module) -> list[list[str]]:
    """Paths of each linear module that more than one path reaches (split_low_rank's shared factors)."""
    paths: dict[int, list[str]] = {}
    for path, module in root.named_modules(remove_duplicate=False):
        if is_linear(module):
            paths.setdefault(id(module), []).append(path)
    return [p for p in paths.values() if len(p) > 1]


def prunable_inputs(root: nn.Module) -> dict[str, nn.Module]:
    return {p: m for p, m in root.named_modules() if is_linear(m) or isinstance(m, nn.modules.conv._ConvNd)}
