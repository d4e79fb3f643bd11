"""Recovery after pruning: refit the linears that lost input channels, by least squares.

For a linear ``y = W x`` whose input keeps channels ``k`` of ``x``, the best weight on
the channels left (in the calibration data's sense) is

    W' = W G[:, k] (G[k, k] + damp I)^-1,   G = sum x x^T over calibration inputs

which reproduces the original output as closely as the remaining channels allow (the
"bias / weight compensation" of FLAP and SliceGPT-style refits). ``G`` is gathered on the
model before the cut, in one pass over the calibration data.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from presso.graph import Graph
from presso.pass_api import Context
from presso.passes.common.modules import is_conv1d, is_linear, stored_weight
from presso.passes.common.solve import refit
from presso.passes.common.stats import calibration_input_stats


@dataclass
class Refit:
    grams: dict[str, torch.Tensor]  # module path -> X^T X over its full input
    keep: dict[str, torch.Tensor]  # module path -> input channels kept
    original: dict[str, torch.Tensor]  # module path -> weight (kept outputs, all inputs) before the cut

    @torch.no_grad()
    def apply(self, root: nn.Module) -> list[str]:
        for path, keep in self.keep.items():
            module = root.get_submodule(path)
            new = refit_weight(self.original[path], self.grams[path], keep)
            new = stored_weight(module, new)
            module.weight.copy_(new.to(module.weight.dtype))
        return sorted(self.keep)


def refit_weight(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``W G[:, k] (G[k, k] + damp I)^-1``, solved in float64."""
    idx = keep.nonzero().squeeze(1)
    g = gram.double()
    return refit(weight, g[:, idx], g[idx][:, idx]).float()


def prepare(graph: Graph, ctx: Context, masks: dict) -> Refit:
    """Before the cut: Gram matrices of every linear whose input dimension will shrink."""
    targets, keep, original = {}, {}, {}
    for name, dims in masks.items():
        path, leaf = name.rsplit(".", 1) if "." in name else ("", name)
        module = graph.module.get_submodule(path)
        if leaf != "weight" or not is_linear(module):
            continue
        conv1d = is_conv1d(module)
        in_mask, out_mask = (dims[0], dims[1]) if conv1d else (dims[1], dims[0])
        if in_mask is None or bool(in_mask.all()):
            continue
        w = module.weight.detach().t() if conv1d else module.weight.detach()
        targets[path], keep[path] = module, in_mask
        original[path] = (w if out_mask is None else w[out_mask]).float().clone()
    stats = calibration_input_stats(graph, ctx, targets, grams=targets, desc="prune_structured: recovery statistics")
    grams = {p: s.xtx for p, s in stats.items()}
    return Refit(grams, keep, original)
