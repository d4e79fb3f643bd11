"""Choosing modules: by pattern, linears the trace calls, weights tied elsewhere; reading linear weights."""
from __future__ import annotations

import fnmatch
from collections.abc import Iterable

import torch
from torch import nn

from presso.graph import Graph


def matches(path: str, patterns: Iterable[str]) -> bool:
    """Glob match on a module path; a bare name also matches as a path component."""
    return any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(path, f"*.{p}") for p in patterns)


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2 and kin): a linear whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D"


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or Hugging Face's ``Conv1D`` (GPT-2's transposed linear)."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight as (out_features, in_features) and bias, for either linear kind."""
    weight = module.weight.detach()
    if is_conv1d(module):
        weight = weight.t()
    return weight, (module.bias.detach() if module.bias is not None else None)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a linear, a ``Conv1D`` or a factored ``LowRankLinear``."""
    if is_conv1d(module):
        return module.weight.shape[1], module.weight.shape[0]
    return module.out_features, module.in_features


def stored_weight(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """An (out, in) ``weight`` in the layout ``module`` stores it in."""
    return weight.t() if is_conv1d(module) else weight


def set_linear_weight(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """New (out, in) weight and bias for either linear kind, its size attributes following."""
    module.weight = nn.Parameter(stored_weight(module, weight).contiguous().clone())
    if bias is not None:
        module.bias = nn.Parameter(bias.contiguous().clone())
    if is_conv1d(module):
        module.nf = weight.shape[0]
    else:
        module.out_features, module.in_features = weight.shape


def select_linears(graph: Graph, skip: tuple[str, ...]) -> tuple[dict[str, nn.Module], list[str]]:
    """Linear layers called in the trace, split into (chosen, skipped paths)."""
    chosen, skipped = {}, []
    for path, module in graph.called_modules().items():
        if not is_linear(module):
            continue
        if matches(path, skip):
            skipped.append(path)
        else:
            chosen[path] = module
    return chosen, skipped


def tied_to_others(root: nn.Module, chosen: dict[str, nn.Module]) -> list[str]:
    """Paths of chosen linears whose weight is also used by a module outside the chosen set."""
    chosen_ids = {id(m) for m in chosen.values()}
    elsewhere = {_storage(p) for m in root.modules() if id(m) not in chosen_ids for p in m.parameters(recurse=False)}
    return [path for path, m in chosen.items() if _storage(m.weight) in elsewhere]


def _storage(t: torch.Tensor) -> int:
    # every meta tensor (a weight still on disk) reports address 0: those are told apart by identity
    return id(t) if t.is_meta else t.data_ptr()


def without_tied(root: nn.Module, chosen: dict[str, nn.Module], tied: str) -> tuple[dict[str, nn.Module], list[str]]:
    """``chosen`` minus the linears whose weight another module shares (a tied lm_head), when
    ``tied == "keep"``: they stay float and shared, since quantizing one would store a second
    copy of the table. Returns the rest and the paths kept."""
    if tied != "keep":
        return chosen, []
    kept = tied_to_others(root, chosen)
    return {p: m for p, m in chosen.items() if p not in kept}, kept
