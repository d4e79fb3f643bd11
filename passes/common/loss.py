"""The calibration loss and its gradients with respect to module outputs.

The loss is next-token cross-entropy when the model maps token ids ``(B, S)`` to logits
``(B, S, V)``; otherwise the mean square of the outputs (a label-free proxy).
"""
from __future__ import annotations

import torch
from torch import nn

from presso.graph import Graph
from presso.pass_api import Context
from presso.passes.common.capture import output_grads_of, rows
from presso.signature import Inputs

LOSS_BATCHES = 8  # a before/after loss is reported on this many calibration batches


def _token_ids(inputs: Inputs) -> torch.Tensor | None:
    return next((t for t in inputs.tensors if not t.is_floating_point() and t.dim() == 2), None)


def is_language_model(inputs: Inputs, outputs) -> bool:
    ids = _token_ids(inputs)
    out = outputs[0] if outputs else None
    # logits: one score per vocabulary entry, so wider than the largest token id (hidden states of
    # an encoder have the same leading shape but are narrower than its vocabulary)
    return (ids is not None and out is not None and out.dim() == 3 and tuple(out.shape[:2]) == tuple(ids.shape)
            and out.shape[-1] > int(ids.max()))


def loss_of(inputs: Inputs, outputs) -> torch.Tensor:
    if is_language_model(inputs, outputs):
        ids = _token_ids(inputs)
        logits = outputs[0][:, :-1].float()
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return sum(o.float().pow(2).mean() for o in outputs if o.is_floating_point())


@torch.no_grad()
def calibration_loss(graph: Graph, ctx: Context) -> float | None:
    """Mean loss over the first calibration batches (next-token NLL for a language model)."""
    if not ctx.calibration:
        return None
    losses = [float(loss_of(b, graph.run(b))) for b in ctx.calibration[:LOSS_BATCHES]]
    return sum(losses) / len(losses)


class _GradsOn:
    """Every parameter of ``module`` requires grad inside the block; flags and grads restored after."""

    def __init__(self, module: nn.Module):
        self.params = dict(module.named_parameters())

    def __enter__(self) -> dict[str, nn.Parameter]:
        self.flags = {n: p.requires_grad for n, p in self.params.items()}
        for p in self.params.values():
            p.requires_grad_(True)
            p.grad = None
        self._grad = torch.enable_grad()
        self._grad.__enter__()
        return self.params

    def __exit__(self, *exc) -> None:
        self._grad.__exit__(*exc)
        for n, p in self.params.items():
            p.grad = None
            p.requires_grad_(self.flags[n])


def parameter_gradients(graph: Graph, ctx: Context, desc: str) -> dict[str, torch.Tensor]:
    """Sum over calibration batches of d loss / d parameter, by parameter name."""
    with _GradsOn(graph.module) as params:
        for inputs in ctx.calibration_batches(desc=desc):
            loss_of(inputs, graph.forward(inputs)).backward()
        return {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}


def output_gradient_grams(graph: Graph, ctx: Context, modules: dict[str, nn.Module],
                          desc: str = "output gradients") -> dict[str, torch.Tensor]:
    """Per module: sum over calibration rows of ``g g^T``, ``g`` = d loss / d module output.

    The output factor of K-FAC's Fisher approximation: an output error ``e`` of the module
    costs about ``e^T (g g^T) e`` in loss, so it says which outputs (and combinations) matter.
    """
    sums: dict[str, torch.Tensor] = {}

    def record(path, grad):
        g = rows(grad)
        sums[path] = sums.get(path, 0) + g.t() @ g

    with _GradsOn(graph.module) as params, output_grads_of(modules, record):
        for inputs in ctx.calibration_batches(desc=desc):
            loss_of(inputs, graph.forward(inputs)).backward()
            for p in params.values():
                p.grad = None
    return sums
