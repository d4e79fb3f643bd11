"""``smooth_quant`` (Xiao et al., 2022): move activation outliers into the weights.

For each group of linears fed by a producer whose scale can move (see
:mod:`presso.passes.common.scale_groups`), input channel ``c`` is divided by
``s[c] = max|x_c| ** alpha / max|W[:, c]| ** (1 - alpha)`` and the weight columns multiplied
by it. The model computes the same function (checked to float tolerance); the activations
become flatter, so per-tensor int8 activations lose less. Run it before
``quantize_static_int8``. ``search=True`` picks ``alpha`` per group from a grid, by the
W8A8 output error on calibration activations.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from presso.errors import ConfigError
from presso.graph import Graph
from presso.pass_api import Context, Pass, PassConfig, PassResult
from presso.passes.common.capture import inputs_of
from presso.passes.common.modules import linear_weight, matches
from presso.passes.common.scale_groups import ScaleGroup, apply_scales, find_scale_groups
from presso.runtime.int8 import quantize_per_channel_int8
from presso.runtime.quant import quantize_activation_params

SEARCH_ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)
SAMPLE_ROWS = 1024  # activation rows kept per group for the alpha search


@dataclass(frozen=True, kw_only=True)
class SmoothQuantConfig(PassConfig):
    alpha: float = 0.5  # migration strength: 0 keeps activations, 1 moves all range into weights
    search: bool = True  # per group, the alpha with the least int8 output error (alpha= when False)
    # consumer linears (glob) whose groups are left alone: an LLM's down_proj input is quantized
    # per token at run time by quantize_static_int8's default, so smoothing it only costs
    skip: tuple[str, ...] = ("*down_proj",)

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha={self.alpha} must be in [0, 1]", hint="SmoothQuant uses 0.5 to 0.85")


class GroupStats:
    def __init__(self, k: int, keep_rows: int):
        self.absmax = torch.zeros(k)
        self.rows: list[torch.Tensor] = []
        self.keep_rows = keep_rows

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1, x.shape[-1])
        self.absmax = torch.maximum(self.absmax, x.abs().amax(0))
        if self.keep_rows:
            idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(len(self.rows)))
            self.rows.append(x[idx[: self.keep_rows]])


class SmoothQuant(Pass):
    name = "smooth_quant"
    Config = SmoothQuantConfig
    summary = "Migrate activation outliers into weights (function-preserving), before static int8."
    requires = frozenset({"calibration"})
    conflicts = {"quantized": "smooth_quant folds scales into float linears: run it before the quantization passes"}

    def run(self, graph: Graph, ctx: Context) -> PassResult:
        cfg = self.config
        groups = [g for g in find_scale_groups(graph) if not any(matches(c, cfg.skip) for c in g.consumers)]
        stats = self._observe(graph, groups, ctx)
        alphas = {}
        for group in groups:
            weights = [linear_weight(graph.module.get_submodule(c))[0].float() for c in group.consumers]
            alpha = search_alpha(stats[group], weights) if cfg.search else cfg.alpha
            apply_scales(graph.module, group, smoothing_scales(stats[group].absmax, weights, alpha))
            alphas[group.producer] = alpha
        return PassResult(graph, modified=bool(groups),
                          stats={"groups": len(groups), "alpha": alphas if cfg.search else cfg.alpha})

    @torch.no_grad()
    def _observe(self, graph: Graph, groups: list[ScaleGroup], ctx: Context) -> dict[ScaleGroup, GroupStats]:
        n = max(len(ctx.calibration or []), 1)
        keep = -(-SAMPLE_ROWS // n) if self.config.search else 0
        firsts = {g: graph.module.get_submodule(g.consumers[0]) for g in groups}
        stats = {g: GroupStats(linear_weight(m)[0].shape[1], keep) for g, m in firsts.items()}
        with inputs_of(firsts, lambda g, x: stats[g].add(x)):
            for inputs in ctx.calibration_batches(desc="smooth_quant: calibration"):
                graph.run(inputs)
        return stats


def smoothing_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    w_absmax = torch.stack([w.abs().amax(0) for w in weights]).amax(0)
    s = act_absmax.clamp(min=1e-5) ** alpha / w_absmax.clamp(min=1e-5) ** (1 - alpha)
    return torch.where((act_absmax > 0) & (w_absmax > 0), s, torch.ones_like(s)).clamp(min=1e-5)


def w8a8_error(x: torch.Tensor, weights: list[torch.Tensor], s: torch.Tensor) -> float:
    """Output error of per-tensor uint8 activations and per-channel int8 weights after smoothing."""
    xs = x / s
    scale, zp = quantize_activation_params(float(xs.min()), float(xs.max()), symmetric=False)
    xq = (torch.clamp(torch.round(xs / scale) + zp, 0, 255) - zp) * scale
    err = 0.0
    for w in weights:
        q, ws = quantize_per_channel_int8(w * s)
        err += float((xq @ (q.float() * ws[:, None]).t() - x @ w.t()).pow(2).sum())
    return err


def search_alpha(stats: GroupStats, weights: list[torch.Tensor]) -> float:
    x = torch.cat(stats.rows)[:SAMPLE_ROWS]
    errors = {a: w8a8_error(x, weights, smoothing_scales(stats.absmax, weights, a)) for a in SEARCH_ALPHAS}
    return min(errors, key=errors.get)
