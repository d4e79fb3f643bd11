"""Helpers shared by passes: choosing modules by pattern, reading linear weights."""
from __future__ import annotations

import fnmatch
from typing import Iterable

import torch
from torch import nn


def matches(path: str, patterns: Iterable[str]) -> bool:
    """Glob match on a module path; a bare name also matches as a path component."""
    return any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(path, f"*.{p}") for p in patterns)


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or Hugging Face's ``Conv1D`` (GPT-2's transposed linear)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight as (out_features, in_features) and bias, for either linear kind."""
    weight = module.weight.detach()
    if type(module).__name__ == "Conv1D":
        weight = weight.t()
    return weight, (module.bias.detach() if module.bias is not None else None)
