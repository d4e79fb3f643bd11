"""How a model is called: normalised inputs, a tensor-only forward for tracing, and outputs.

Tracing and ONNX want ``forward(t0, t1, ...) -> (y0, y1, ...)``; users want their own call
convention back (a tensor, a tuple, or a Hugging Face ``ModelOutput`` with ``.logits``).
``CallSpec`` records both sides so every backend returns the same structure.
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from presso.errors import TraceError


@dataclass(frozen=True)
class Inputs:
    """Example or calibration inputs, normalised to positional and keyword tensors."""

    args: tuple[torch.Tensor, ...] = ()
    kwargs: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.args + tuple(self.kwargs.values())


def normalize_inputs(value: Any, what: str = "example_inputs") -> Inputs:
    """Accept a tensor, a tuple/list of tensors, a dict of tensors, or an :class:`Inputs`."""
    if isinstance(value, Inputs):
        return value
    if isinstance(value, torch.Tensor):
        return Inputs(args=(value,))
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return Inputs(args=tuple(value))
    if isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
        return Inputs(kwargs={str(k): v for k, v in value.items()})
    raise TraceError(
        f"{what} must be a tensor, a non-empty tuple of tensors or a dict of tensors, got {_describe(value)}",
        hint="for a language model pass a batch of token ids, e.g. torch.randint(0, vocab, (1, 16))",
    )


def _describe(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__} of ({', '.join(type(v).__name__ for v in value)})"
    return type(value).__name__


def is_hf_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


@dataclass
class CallSpec:
    """Input names (positional first) and the structure of the outputs."""

    input_names: list[str]
    n_args: int
    hf: bool
    output_kind: str = "tensor"  # "tensor" | "tuple" | "mapping"
    output_keys: list[str] = field(default_factory=list)
    output_class: str = ""

    def flatten_inputs(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, ...]:
        """Bind a call's tensors to the traced input names (by position, then by name)."""
        bound = dict(zip(self.input_names, args))
        extra = [k for k in kwargs if k in bound or k not in self.input_names]
        bound.update({k: v for k, v in kwargs.items() if k in self.input_names})
        missing = [n for n in self.input_names if n not in bound]
        if len(args) > len(self.input_names) or extra or missing:
            raise TraceError(
                f"the compiled model takes inputs {self.input_names}; this call gave {len(args)} "
                f"positional and {sorted(kwargs) or 'no'} keyword input(s)"
                + (f", missing {missing}" if missing else "") + (f", unexpected {extra}" if extra else ""),
                hint="call it with the inputs given as example_inputs, or compile again with other example_inputs",
            )
        return tuple(bound[n] for n in self.input_names)

    def flatten_outputs(self, out: Any) -> tuple[torch.Tensor, ...]:
        if isinstance(out, torch.Tensor):
            return (out,)
        if isinstance(out, dict):  # ModelOutput is a dict
            return tuple(out[k] for k in self.output_keys)
        return tuple(out)

    def unflatten_outputs(self, tensors: list[torch.Tensor]) -> Any:
        if self.output_kind == "tensor":
            return tensors[0]
        if self.output_kind == "tuple":
            return tuple(tensors)
        values = dict(zip(self.output_keys, tensors))
        return _output_class(self.output_class)(**values)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _output_class(path: str) -> type:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        from transformers.utils import ModelOutput

        return ModelOutput


def make_call_spec(model: nn.Module, inputs: Inputs, outputs: Any) -> CallSpec:
    """Build the spec from the example inputs and the eager outputs they produced."""
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    arg_names = [p.name for p in params[: len(inputs.args)]]
    arg_names += [f"input_{i}" for i in range(len(arg_names), len(inputs.args))]
    spec = CallSpec(input_names=arg_names + list(inputs.kwargs), n_args=len(inputs.args), hf=is_hf_model(model))
    if isinstance(outputs, torch.Tensor):
        return spec
    if isinstance(outputs, dict):
        spec.output_kind = "mapping"
        spec.output_keys = [k for k, v in outputs.items() if isinstance(v, torch.Tensor)]
        spec.output_class = f"{type(outputs).__module__}.{type(outputs).__qualname__}"
    elif isinstance(outputs, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in outputs):
        spec.output_kind = "tuple"
    else:
        raise TraceError(
            f"{type(model).__name__} returned {_describe(outputs)}; presso needs tensors, "
            "a tuple of tensors or a dict/ModelOutput of tensors",
            hint="wrap the model in a small nn.Module whose forward returns tensors",
        )
    return spec


class Traceable(nn.Module):
    """``forward(*tensors) -> tuple of tensors`` around a model, for tracing and export."""

    def __init__(self, model: nn.Module, spec: CallSpec):
        super().__init__()
        self.model = model
        self.spec = spec

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = self.spec.n_args
        kwargs = dict(zip(self.spec.input_names[n:], tensors[n:]))
        out = self.model(*tensors[:n], **kwargs, **hf_call_options(self.model))
        return self.spec.flatten_outputs(out)


def hf_call_options(model: nn.Module) -> dict[str, Any]:
    """Hugging Face models are traced without a KV cache and with dict outputs."""
    if not is_hf_model(model):
        return {}
    names = inspect.signature(model.forward).parameters
    opts: dict[str, Any] = {"return_dict": True}
    if "use_cache" in names:
        opts["use_cache"] = False
    return opts
