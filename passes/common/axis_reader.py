"""The reader behind :mod:`.axis_rules`: it walks an exported program once and applies the rules.

Every tensor gets fresh atoms per dimension; the rule of each op (registered with
:func:`rule`) unifies them with its inputs'. An op without a rule freezes the atoms of all
its tensors, so an unknown pattern is left alone rather than cut wrongly. Pointwise ops are
recognised by their ``torch.Tag.pointwise`` tag and broadcast here.
"""
from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from presso.passes.common.axes import Axes, concrete, shape_of

Dims = list  # one Layout per tensor dimension
RULES: dict[Any, Callable] = {}

IGNORED = {"sym_size", "_assert_tensor_metadata", "sym_constrain_range_for_size", "_assert_scalar",
           "sym_numel", "sym_storage_offset", "sym_stride"}


def rule(*names: str):
    def register(fn):
        for n in names:
            RULES[n] = fn
        return fn
    return register


class Reader:
    """Assigns layouts to every node of an exported program."""

    def __init__(self, axes: Axes):
        self.axes = axes
        self.dims: dict[fx.Node, Any] = {}

    def fresh(self, node: fx.Node) -> Dims | None:
        shape = shape_of(node)
        return None if shape is None else [self.axes.new(concrete(d)) for d in shape]

    def of(self, arg) -> Dims | None:
        return self.dims.get(arg) if isinstance(arg, fx.Node) else None

    def visit(self, node: fx.Node) -> None:
        name = op_name(node)
        if name in IGNORED:
            return
        out = self._outputs(node)
        self.dims[node] = out
        fn = RULES.get(name) or (pointwise if is_pointwise(node) else None)
        where = f"{name} ({node.name})"
        if fn is None or fn(self, node, out, where) is False:
            self.freeze_node(node, f"no coupling rule for {where}")

    def _outputs(self, node: fx.Node):
        val = node.meta.get("val")
        if isinstance(val, (tuple, list)):
            return [[self.axes.new(concrete(d)) for d in v.shape] if isinstance(v, torch.Tensor) else None
                    for v in val]
        return self.fresh(node)

    def freeze_node(self, node: fx.Node, reason: str) -> None:
        for arg in list(node.all_input_nodes) + [node]:
            for dims in _tensor_dims(self.dims.get(arg)):
                for d in dims:
                    self.axes.freeze(d, reason)

    def tie(self, a: Dims, b: Dims, where: str) -> None:
        for x, y in zip(a, b):
            self.axes.unify(x, y, where)


def _tensor_dims(value) -> list[Dims]:
    """The per-dimension layouts of a node: one list, or one per tensor of a tuple output."""
    if value is None:
        return []
    if any(isinstance(v, list) for v in value):
        return [v for v in value if isinstance(v, list)]
    return [value]


def op_name(node: fx.Node) -> str:
    t = node.target
    if t is operator.getitem:
        return "getitem"
    packet = getattr(t, "_overloadpacket", None)
    if packet is not None:
        return packet.__name__
    return getattr(t, "__name__", str(t))


def is_pointwise(node: fx.Node) -> bool:
    return torch.Tag.pointwise in getattr(node.target, "tags", ())


def read_graph(ep: torch.export.ExportedProgram, axes: Axes) -> Reader:
    reader = Reader(axes)
    for node in ep.graph.nodes:
        if node.op == "placeholder":
            reader.dims[node] = reader.fresh(node)
        elif node.op == "call_function":
            reader.visit(node)
        elif node.op == "output":
            for arg in node.all_input_nodes:
                for dims in _tensor_dims(reader.dims.get(arg)):
                    for d in dims:
                        axes.freeze(d, "a model output keeps its shape")
    return reader


# --- rules: each gets (reader, node, out dims, where) ---------------------------------------
def pointwise(r: Reader, node: fx.Node, out: Dims, where: str):
    if out is None:
        return None
    for arg in node.all_input_nodes:
        broadcast(r, arg, out, where)


def broadcast(r: Reader, arg: fx.Node, out: Dims, where: str) -> None:
    """Tie ``arg``'s dimensions to ``out``'s, aligned from the right, except broadcast ones."""
    dims, shape = r.of(arg), shape_of(arg)
    if dims is None or shape is None or isinstance(dims[0] if dims else None, list):
        return
    for k in range(1, len(shape) + 1):
        if k <= len(out) and shape[-k] != 1:
            r.axes.unify(dims[-k], out[-k], where)
