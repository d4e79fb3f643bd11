"""Calibration statistics for pruning: input norms and Gram matrices, gradients, loss.

The loss is next-token cross-entropy when the model maps token ids ``(B, S)`` to logits
``(B, S, V)``; otherwise the mean square of the outputs (a label-free proxy).
"""
from __future__ import annotations

import torch
from torch import nn

from presso.graph import Graph
from presso.pass_api import Context
from presso.passes.common import is_linear
from presso.signature import Inputs


LOSS_BATCHES = 8  # the before/after-recovery loss is reported on this many calibration batches


def _forward(graph: Graph, inputs: Inputs) -> tuple[torch.Tensor, ...]:
    return graph.traceable()(*graph.spec.flatten_inputs(inputs.args, inputs.kwargs))


def is_language_model(graph: Graph, inputs: Inputs, outputs) -> bool:
    ids = next((t for t in inputs.tensors if not t.is_floating_point() and t.dim() == 2), None)
    out = outputs[0] if outputs else None
    # logits: one score per vocabulary entry, so wider than the largest token id (hidden states of
    # an encoder have the same leading shape but are narrower than its vocabulary)
    return (ids is not None and out is not None and out.dim() == 3 and tuple(out.shape[:2]) == tuple(ids.shape)
            and out.shape[-1] > int(ids.max()))


def loss_of(graph: Graph, inputs: Inputs, outputs) -> torch.Tensor:
    if is_language_model(graph, inputs, outputs):
        ids = next(t for t in inputs.tensors if not t.is_floating_point() and t.dim() == 2)
        logits = outputs[0][:, :-1].float()
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return sum(o.float().pow(2).mean() for o in outputs if o.is_floating_point())


def gradients(graph: Graph, ctx: Context) -> dict[str, torch.Tensor]:
    """Sum over calibration batches of d loss / d parameter, by parameter name."""
    params = dict(graph.module.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
        p.grad = None
    try:
        with torch.enable_grad():
            for inputs in ctx.calibration_batches(desc="prune_structured: gradients"):
                loss_of(graph, inputs, _forward(graph, inputs)).backward()
        return {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}
    finally:
        for n, p in params.items():
            p.grad = None
            p.requires_grad_(flags[n])


def output_gradient_grams(graph: Graph, ctx: Context, modules: dict[str, nn.Module],
                          desc: str = "output gradients") -> dict[str, torch.Tensor]:
    """Per module: sum over calibration rows of ``g g^T``, ``g`` = d loss / d module output.

    The output factor of K-FAC's Fisher approximation: an output error ``e`` of the module
    costs about ``e^T (g g^T) e`` in loss, so it says which outputs (and combinations) matter.
    """
    sums: dict[str, torch.Tensor] = {}

    def hook(path):
        def record(_m, _grad_in, grad_out):
            g = grad_out[0].detach().reshape(-1, grad_out[0].shape[-1]).float()
            sums[path] = sums.get(path, 0) + g.t() @ g
        return record

    params = list(graph.module.parameters())
    flags = [p.requires_grad for p in params]
    handles = [m.register_full_backward_hook(hook(p)) for p, m in modules.items()]
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            for inputs in ctx.calibration_batches(desc=desc):
                outputs = _forward(graph, inputs)
                loss_of(graph, inputs, outputs).backward()
                for p in params:
                    p.grad = None
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(params, flags):
            p.grad = None
            p.requires_grad_(flag)
    return sums


class InputRecorder:
    """Forward pre-hooks summing each module's input x_j^2 per channel (and X^T X if asked)."""

    def __init__(self, modules: dict[str, nn.Module], grams: set[str] = frozenset()):
        self.sq: dict[str, torch.Tensor] = {}
        self.gram: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self._grams = grams
        self._handles = [m.register_forward_pre_hook(self._hook(p, m)) for p, m in modules.items()]

    def _hook(self, path: str, module: nn.Module):
        def hook(_m, args):
            x = args[0].detach().float()
            x = x.movedim(1, -1) if isinstance(module, nn.modules.conv._ConvNd) else x
            x = x.reshape(-1, x.shape[-1])
            self.sq[path] = self.sq.get(path, 0) + x.pow(2).sum(0)
            self.rows[path] = self.rows.get(path, 0) + x.shape[0]
            if path in self._grams:
                self.gram[path] = self.gram.get(path, 0) + x.t() @ x
        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()


@torch.no_grad()
def record_inputs(graph: Graph, ctx: Context, modules: dict[str, nn.Module], grams: set[str] = frozenset(),
                  desc: str = "prune_structured: activations") -> InputRecorder:
    recorder = InputRecorder(modules, grams)
    try:
        for inputs in ctx.calibration_batches(desc=desc):
            graph.run(inputs)
    finally:
        recorder.close()
    return recorder


@torch.no_grad()
def calibration_loss(graph: Graph, ctx: Context) -> float | None:
    """Mean loss over the calibration batches (next-token NLL for a language model)."""
    if not ctx.calibration:
        return None
    losses = [float(loss_of(graph, b, graph.run(b))) for b in ctx.calibration[:LOSS_BATCHES]]
    return sum(losses) / len(losses)


def prunable_inputs(root: nn.Module) -> dict[str, nn.Module]:
    return {p: m for p, m in root.named_modules() if is_linear(m) or isinstance(m, nn.modules.conv._ConvNd)}
