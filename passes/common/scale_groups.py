"""Per-channel scales that can move between an op and the linears it feeds.

If linears ``L1..Ln`` read the output of a producer ``P`` and nothing else does, then
dividing ``P``'s output channel ``c`` by ``s[c]`` and multiplying column ``c`` of every
``Li`` by ``s[c]`` leaves the model's function unchanged. SmoothQuant uses that to move
activation outliers into weights; AWQ to give salient input channels finer weight steps.

Found from the traced graph (not from module names), for producers that are
* a normalization's final affine op (LayerNorm, RMSNorm: ``x * weight (+ bias)``), and
* a linear whose output is multiplied elementwise into the consumer's input (the ``up``
  projection of a gated MLP: ``down(act(gate(x)) * up(x))``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from presso.graph import Graph
from presso.passes.common.modules import is_conv1d, is_linear

aten = torch.ops.aten
# ops that keep the channel (last) dimension as it is
_TRANSPARENT = {aten.view.default, aten.reshape.default, aten._to_copy.default, aten.clone.default,
                aten.contiguous.default, aten.alias.default, aten._unsafe_view.default}


@dataclass(frozen=True)
class ScaleGroup:
    producer: str  # module path
    kind: str  # "norm" | "linear"
    consumers: tuple[str, ...]


def _activation_input(node: fx.Node, weight_input: fx.Node) -> fx.Node | None:
    for arg in node.all_input_nodes:
        if arg is not weight_input and arg.op != "placeholder":
            return arg
    return None


def _skip_transparent_up(node: fx.Node) -> fx.Node:
    while node.op == "call_function" and node.target in _TRANSPARENT:
        node = node.all_input_nodes[0]
    return node


def _uses(node: fx.Node) -> list[fx.Node]:
    """Users of ``node``, looking through channel-preserving ops."""
    out = []
    for user in node.users:
        out += _uses(user) if user.op == "call_function" and user.target in _TRANSPARENT else [user]
    return out


def _linear_nodes(graph: Graph, linears: dict[str, nn.Module]) -> dict[fx.Node, str]:
    """The op node that reads each linear's weight."""
    by_weight = {f"{path}.weight": path for path in linears}
    found = {}
    for node, info in graph.nodes():
        hits = [by_weight[p] for p in info.params if p in by_weight]
        if len(hits) == 1:
            found[node] = hits[0]
    return found


def find_scale_groups(graph: Graph) -> list[ScaleGroup]:
    modules = dict(graph.module.named_modules())
    linears = {p: m for p, m in modules.items() if is_linear(m)}
    linear_at = _linear_nodes(graph, linears)
    producers: dict[fx.Node, list[fx.Node]] = {}
    for node in linear_at:
        weight_arg = next((a for a in node.all_input_nodes if a.op == "placeholder"
                           and a.name in _param_placeholders(graph)), None)
        act = _activation_input(node, weight_arg)
        if act is not None:
            producers.setdefault(_skip_transparent_up(act), []).append(node)
    shared = _shared_parameters(graph.module)
    groups = []
    for prod, consumers in producers.items():
        if {u for u in _uses(prod)} != set(consumers):
            continue  # the producer's output also goes elsewhere (a residual stream): not movable
        group = _norm_group(prod, modules) or _gated_group(prod, linear_at, modules)
        paths = (group[0], *(linear_at[c] for c in consumers)) if group else ()
        if group and not any(id(modules[p].weight) in shared for p in paths):  # tied: scaling would leak
            groups.append(ScaleGroup(group[0], group[1], tuple(linear_at[c] for c in consumers)))
    return groups


def _shared_parameters(root: nn.Module) -> set[int]:
    owners: dict[int, int] = {}
    for m in root.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    return {k for k, n in owners.items() if n > 1}


def _param_placeholders(graph: Graph) -> set[str]:
    sig = graph.exported.graph_signature
    return set(sig.inputs_to_parameters) | set(sig.inputs_to_buffers)


def _norm_group(prod: fx.Node, modules: dict[str, nn.Module]) -> tuple[str, str] | None:
    info = prod.meta.get("presso")
    if info is None or "norm" not in info.module_type.lower():
        return None
    module = modules.get(info.module_path)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 1 or f"{info.module_path}.weight" not in info.params:
        return None  # not the norm's final affine op
    return info.module_path, "norm"


def _gated_group(prod: fx.Node, linear_at: dict[fx.Node, str], modules) -> tuple[str, str] | None:
    if prod.op != "call_function" or prod.target is not aten.mul.Tensor:
        return None
    for arg in prod.args:
        if not isinstance(arg, fx.Node):
            continue
        src = _skip_transparent_up(arg)
        if src.op == "call_function" and src.target is aten.add.Tensor:  # bias added after the matmul
            src = next((a for a in src.all_input_nodes if a in linear_at), src)
        if src in linear_at and len(_uses(src)) == 1:
            return linear_at[src], "linear"
    return None


@torch.no_grad()
def apply_scales(root: nn.Module, group: ScaleGroup, s: torch.Tensor) -> None:
    """Producer output channels divided by ``s``, consumer input columns multiplied by it."""
    producer = root.get_submodule(group.producer)
    if group.kind == "norm":
        producer.weight.div_(s.to(producer.weight.dtype))
        if getattr(producer, "bias", None) is not None:
            producer.bias.div_(s.to(producer.bias.dtype))
    else:
        _scale_outputs(producer, 1.0 / s)
    for path in group.consumers:
        _scale_inputs(root.get_submodule(path), s)


def _scale_outputs(linear: nn.Module, s: torch.Tensor) -> None:
    conv1d = is_conv1d(linear)  # weight stored (in, out)
    linear.weight.mul_(s[None, :] if conv1d else s[:, None])
    if linear.bias is not None:
        linear.bias.mul_(s)


def _scale_inputs(linear: nn.Module, s: torch.Tensor) -> None:
    conv1d = is_conv1d(linear)
    linear.weight.mul_(s[:, None] if conv1d else s[None, :])
