"""Dependency groups: the units structured pruning removes, built from the traced graph.

A :class:`DepGroup` is one prunable dimension of the model with every parameter slice
coupled to it: an MLP's neurons (``up``/``gate`` rows and ``down`` columns), one
attention's heads (q/k/v/o slices of each head; under GQA the query heads of each kv
head), the residual stream (``hidden``: embeddings, norms and every linear reading or
writing it), conv channels with their BatchNorm and depthwise convs. Groups come from
:mod:`.axes`; what they are called (``family``) comes from where their atoms sit:

* ``heads`` / ``kv_heads``: the major factors of ``Prod(heads, head_dim)`` in a linear's weight
* ``hidden``: touches a LayerNorm/RMSNorm weight (the residual stream)
* ``channels``: touches a conv weight
* ``mlp``: any other dimension shared by linears

Dimensions that stay whole (head_dim, vocabulary, model inputs and outputs, frozen atoms)
are not groups; frozen ones are listed with the reason in :attr:`DepGraph.frozen`.
"""
from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from presso.graph import Graph, _strip
from presso.passes.common.axes import Atom, Axes, Cat, Prod
from presso.passes.common.axis_rules import read_graph
from presso.passes.common.modules import is_linear

FAMILIES = ("heads", "kv_heads", "mlp", "channels", "hidden")


@dataclass
class Member:
    """One parameter dimension a group cuts: ``units[i]`` is the unit of position ``i`` (or -1)."""

    param: str
    dim: int
    units: torch.Tensor


@dataclass
class DepGroup:
    name: str
    family: str
    axes: tuple[int, ...]  # root atom ids; two for GQA query heads (kv head, index in group)
    size: int  # number of units
    members: list[Member] = field(default_factory=list)
    per_block: int = 1  # GQA heads: units come in blocks of this many (one block per kv head)

    @property
    def modules(self) -> list[str]:
        return sorted({m.param.rsplit(".", 1)[0] for m in self.members})


@dataclass
class DepGraph:
    groups: list[DepGroup]
    frozen: dict[str, str]  # parameter dimension ("name:dim") -> why it is left alone
    params: dict[str, torch.Tensor]

    def by_family(self, *families: str) -> list[DepGroup]:
        return [g for g in self.groups if g.family in families]


def build_dep_graph(graph: Graph) -> DepGraph:
    ep = graph.exported
    axes = Axes()
    reader = read_graph(ep, axes)
    param_dims, params = _parameter_dims(graph, ep, reader, axes)
    roles = _roles(param_dims, axes, _module_kinds(graph.module, param_dims))
    groups = []
    for key, family in _families(roles).items():
        if any(axes.frozen.get(i) for i in key):
            continue
        group = _make_group(key, family, param_dims, axes)
        if group.members:
            taken = sum(g.name.split("#")[0] == group.name for g in groups)
            group.name += f"#{taken + 1}" if taken else ""  # names key the keep decisions
            groups.append(group)
    frozen = {f"{p}:{d}": axes.frozen_reason(a) for p, dims in param_dims.items() for d, layout in enumerate(dims)
              for a in axes.atoms(layout) if axes.frozen_reason(a)}
    return DepGraph(groups, frozen, params)


def _parameter_dims(graph: Graph, ep, reader, axes: Axes):
    sig = ep.graph_signature
    names = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    state = dict(graph.module.named_parameters(remove_duplicate=False))
    state.update(dict(graph.module.named_buffers(remove_duplicate=False)))
    param_dims, params = {}, {}
    for node in ep.graph.nodes:
        if node.op != "placeholder" or reader.dims.get(node) is None:
            continue
        name = _strip(names.get(node.name, ""))
        if name in state:
            param_dims[name], params[name] = reader.dims[node], state[name]
        else:  # user inputs and lifted constants keep their shape
            for d in reader.dims[node]:
                axes.freeze(d, "a model input or constant keeps its shape")
    return param_dims, params


def _module_kinds(root: nn.Module, param_dims) -> dict[str, str]:
    kinds = {}
    for name in param_dims:
        module = root.get_submodule(name.rsplit(".", 1)[0]) if "." in name else root
        cls = type(module).__name__
        kinds[name] = ("conv" if isinstance(module, nn.modules.conv._ConvNd) else
                       "linear" if is_linear(module) else
                       "norm" if cls.endswith(("LayerNorm", "RMSNorm")) or isinstance(module, nn.LayerNorm) else
                       "batchnorm" if isinstance(module, nn.modules.batchnorm._BatchNorm) else cls)
    return kinds


def _roles(param_dims, axes: Axes, kinds: dict[str, str]) -> dict[tuple[int, ...], set[str]]:
    """For every atom (and GQA atom pair): the kinds of modules and positions it appears in."""
    roles: dict[tuple[int, ...], set[str]] = defaultdict(set)
    for name, dims in param_dims.items():
        for layout in dims:
            for a in axes.atoms(layout):
                roles[(a.id,)].add(kinds[name])
            _walk_products(axes.expand(layout), kinds[name] == "linear", roles, axes)
    return roles


def _walk_products(layout, in_linear: bool, roles, axes: Axes) -> None:
    if isinstance(layout, Cat):
        for p in layout.parts:
            _walk_products(p, in_linear, roles, axes)
    elif isinstance(layout, Prod):
        # heads: atoms major to a head dimension, whatever that dimension's inner layout (rotary
        # halves make it a concatenation in Falcon)
        if in_linear and all(isinstance(p, Atom) for p in layout.parts[:-1]):
            _head_roles(layout.parts, roles, axes)
        for p in layout.parts[1:]:
            for a in axes.atoms(p):
                roles[(a.id,)].add("minor")
        _walk_products(layout.parts[0], in_linear, roles, axes)


def _head_roles(parts, roles, axes: Axes) -> None:
    if any(axes.frozen_reason(p) for p in parts[:-1]):
        return
    if len(parts) == 2:
        roles[(parts[0].id,)].add("head")
    elif len(parts) == 3:
        roles[(parts[0].id,)].add("kv_head")
        roles[(parts[0].id, parts[1].id)].add("head")


def _families(roles) -> dict[tuple[int, ...], str]:
    out = {}
    for key, r in roles.items():
        if "kv_head" in r:
            out[key] = "kv_heads"
        elif "head" in r:
            out[key] = "heads"
        elif "conv" in r and "norm" in r:
            out[key] = "hidden"
        elif "conv" in r:
            out[key] = "channels"
        elif "minor" in r:
            continue  # head_dim and other inner factors stay whole
        elif "norm" in r:
            out[key] = "hidden"
        elif "linear" in r:
            out[key] = "mlp"
    return out


def _make_group(key: tuple[int, ...], family: str, param_dims, axes: Axes) -> DepGroup:
    members = []
    size = 0
    for name, dims in param_dims.items():
        for d, layout in enumerate(dims):
            units, n = unit_labels(axes.expand(layout), key)
            if n:
                members.append(Member(name, d, units))
                size = n
    per_block = 1
    if len(key) == 2:
        per_block = next(a.size for a in _all_atoms(param_dims, axes) if a.id == key[1])
    modules = sorted({m.param.rsplit(".", 1)[0] for m in members})
    return DepGroup(f"{family}:{_common_prefix(modules) or 'model'}", family, key, size, members, per_block)


def _all_atoms(param_dims, axes: Axes):
    for dims in param_dims.values():
        for layout in dims:
            yield from axes.atoms(layout)


def _common_prefix(paths: list[str]) -> str:
    parts = os.path.commonprefix([p.split(".") for p in paths])
    return ".".join(parts)


def unit_labels(layout, key: tuple[int, ...]) -> tuple[torch.Tensor, int]:
    """Unit index of every position of a dimension laid out as ``layout`` (-1: not in the group)."""
    if layout is None:
        return torch.empty(0, dtype=torch.long), 0
    if isinstance(layout, Atom):
        if key == (layout.id,):
            return torch.arange(layout.size), layout.size
        return torch.full((layout.size,), -1), 0
    if isinstance(layout, Cat):
        found = [unit_labels(p, key) for p in layout.parts]
        return torch.cat([f[0] for f in found]), max(f[1] for f in found)
    return _prod_labels(layout.parts, key)


def _prod_labels(parts, key) -> tuple[torch.Tensor, int]:
    ids = [p.id if isinstance(p, Atom) else None for p in parts]
    factors, n = [], 0
    i = 0
    while i < len(parts):
        if len(key) == 2 and tuple(ids[i:i + 2]) == key:
            size = parts[i].size * parts[i + 1].size
            factors.append(torch.arange(size))
            n, i = size, i + 2
            continue
        labels, found = unit_labels(parts[i], key)
        factors.append(labels)
        n, i = max(n, found), i + 1
    out = factors[0]
    for f in factors[1:]:
        out = torch.maximum(out[:, None], f[None, :]).reshape(-1)
    return out, n
