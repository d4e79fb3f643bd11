"""Helpers for testing a pass, for presso's tests and for plugin authors.

    from presso.testing import check_pass
    check_pass(MyPass(), model, example_inputs, tolerance=1e-3)

checks the outputs against the original model, the absence of NaN/Inf, that the caller's
model is unchanged, and that the pass config survives a JSON round trip.
"""
from __future__ import annotations

import copy
import json
from typing import Any

import torch
from torch import nn

from presso.api import compile
from presso.compiled import CompiledModel
from presso.numerics import non_finite, rel_error
from presso.pass_api import Pass
from presso.signature import hf_call_options, normalize_inputs


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], str, bool]:
    """State, structure and training flag of a model, to compare later."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, repr(model), model.training


def assert_unchanged(model: nn.Module, before: tuple[dict[str, torch.Tensor], str, bool]) -> None:
    state, structure, training = before
    now = model.state_dict()
    assert set(now) == set(state), f"state_dict keys changed: {set(now) ^ set(state)}"
    for k, v in state.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), f"tensor {k} of the caller's model changed"
    assert repr(model) == structure, "the caller's module structure changed"
    assert model.training == training, "the caller's train/eval mode changed"


def assert_config_roundtrip(p: Pass) -> None:
    data = json.loads(json.dumps(p.config.to_dict()))
    assert type(p)(**data).config == p.config, f"{p.name} config does not survive a JSON round trip"


def outputs_of(result: Any) -> list[torch.Tensor]:
    """Tensors of a model call result (tensor, tuple, dict or ModelOutput)."""
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, dict):
        return [v for v in result.values() if isinstance(v, torch.Tensor)]
    return [v for v in result if isinstance(v, torch.Tensor)]


@torch.no_grad()
def call(model: Any, inputs: Any) -> list[torch.Tensor]:
    """Call ``model`` with inputs given as for ``example_inputs``; HF models without a KV cache."""
    inp = normalize_inputs(inputs)
    extra = hf_call_options(model) if isinstance(model, nn.Module) else {}
    return outputs_of(model(*inp.args, **inp.kwargs, **extra))


def check_pass(p: Pass, model: nn.Module, example_inputs: Any, *, tolerance: float,
               calibration: Any = None, backend: str = "torch") -> CompiledModel:
    """Compile with ``p`` alone and check it; returns the compiled model for further checks."""
    before = snapshot(model)
    reference = call(copy.deepcopy(model).eval(), example_inputs)
    compiled = compile(model, [p], example_inputs=example_inputs, calibration=calibration, backend=backend)
    assert_unchanged(model, before)
    got = call(compiled, example_inputs)
    assert not non_finite(got), f"{p.name} produced NaN/Inf"
    err = rel_error(got, reference[: len(got)])
    assert err <= tolerance, f"{p.name}: relative error {err:.3g} above tolerance {tolerance:g}"
    assert_config_roundtrip(p)
    return compiled
