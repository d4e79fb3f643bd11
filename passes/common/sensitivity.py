"""Mixed-precision policy: measure how much each layer's output moves when quantized.

Each candidate layer runs, on the inputs it receives from calibration data, both as it is
and as its quantized replacement would; the relative L2 error of its output is its
sensitivity. The most sensitive layers are kept at higher precision.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from presso.graph import Graph
from presso.passes.common.capture import calls_and_outputs_of
from presso.signature import Inputs

SENSITIVITY_BATCHES = 4  # a few batches rank layers reliably; the ranking is all that is used


@torch.no_grad()
def layer_errors(graph: Graph, modules: dict[str, nn.Module], quantized: Callable[[str, nn.Module], nn.Module],
                 batches: list[Inputs]) -> dict[str, float]:
    """Relative output error per module path, over the first few calibration batches."""
    replacements = {path: quantized(path, m) for path, m in modules.items()}
    sums = {path: [0.0, 0.0] for path in modules}

    def record(path, args, out):
        ref = out.float()
        got = replacements[path](*args).float()
        sums[path][0] += float((got - ref).pow(2).sum())
        sums[path][1] += float(ref.pow(2).sum())

    with calls_and_outputs_of(modules, record):
        for inputs in batches[:SENSITIVITY_BATCHES]:
            graph.run(inputs)
    return {p: (e / n) ** 0.5 if n > 0 else 0.0 for p, (e, n) in sums.items()}


def most_sensitive(errors: dict[str, float], count: int) -> dict[str, float]:
    """The ``count`` largest errors, largest first."""
    ranked = sorted(errors.items(), key=lambda kv: kv[1], reverse=True)[:count]
    return {p: round(e, 6) for p, e in ranked}
