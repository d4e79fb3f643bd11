"""Importance of pruning units: the policy half of structured pruning.

An :class:`Importance` scores every unit of a :class:`DepGroup` (a head, a neuron, a
channel). The default ``score`` asks ``element`` for a saliency per weight element of each
member parameter, sums it over each unit's slice, and aggregates over the group's
members (``sum``, ``mean`` or ``max``), so a new importance is usually one method.
Third parties register theirs with the ``presso_register_importances`` hook.

Built-ins:
* ``magnitude``: squared weights (the group's L2 norm, squared), ``magnitude_l1``: |W|
* ``taylor``: |W * dL/dW|, first order, gradients of the loss on calibration data
* ``activation``: |W| times the L2 norm of the input channel it multiplies (Wanda)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import nn

from presso.passes.common.dep_groups import DepGroup
from presso.passes.common.modules import is_conv1d

Aggregate = Literal["sum", "mean", "max"]


@dataclass
class Evidence:
    """What importances may read: parameters, and (when asked for) gradients and input norms."""

    params: dict[str, torch.Tensor]
    module_of: dict[str, nn.Module]  # parameter name -> owning module
    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    input_sq: dict[str, torch.Tensor] = field(default_factory=dict)  # module path -> sum of x_j^2


class Importance:
    """Base of every importance: set ``name`` and ``needs``; implement ``element`` or ``score``."""

    name: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset()  # "gradients", "activations"

    def element(self, param: str, ev: Evidence) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def score(self, group: DepGroup, ev: Evidence, aggregate: Aggregate = "sum") -> torch.Tensor:
        per_member = []
        for m in group.members:
            sal = self.element(m.param, ev).float()
            rows = sal.movedim(m.dim, 0).reshape(sal.shape[m.dim], -1).sum(1)
            unit = torch.zeros(group.size).index_add_(0, m.units.clamp(min=0), rows * (m.units >= 0))
            per_member.append(unit)
        stacked = torch.stack(per_member)
        if aggregate == "mean":
            return stacked.mean(0)
        return stacked.amax(0) if aggregate == "max" else stacked.sum(0)


class Magnitude(Importance):
    name = "magnitude"

    def element(self, param, ev):
        return ev.params[param].detach().float().pow(2)


class MagnitudeL1(Importance):
    name = "magnitude_l1"

    def element(self, param, ev):
        return ev.params[param].detach().float().abs()


class Taylor(Importance):
    name = "taylor"
    needs = frozenset({"gradients"})

    def element(self, param, ev):
        w = ev.params[param].detach().float()
        g = ev.grads.get(param)
        return (w * g).abs() if g is not None else torch.zeros_like(w)


class Activation(Importance):
    name = "activation"
    needs = frozenset({"activations"})

    def element(self, param, ev):
        w = ev.params[param].detach().float().abs()
        module = ev.module_of[param]
        sq = ev.input_sq.get(param.rsplit(".", 1)[0])
        if sq is None or not param.endswith("weight"):
            return w
        norm = sq.sqrt()
        if is_conv1d(module):  # weight (in, out)
            return w * norm[:, None]
        if isinstance(module, nn.Linear):
            return w * norm[None, :]
        if isinstance(module, nn.modules.conv._ConvNd) and module.groups == 1:
            return w * norm.view(1, -1, *([1] * (w.dim() - 2)))
        return w


BUILTIN_IMPORTANCES = (Magnitude, MagnitudeL1, Taylor, Activation)
