"""The precision a model is lowered to ONNX in.

ONNX Runtime's CPU kernels compute in float32 (it has no bfloat16 ``Mul`` or ``MatMul``, and
``MatMulNBits`` reads float32 or float16 activations only), so a bfloat16 or float16 model is
lowered with its float parts in float32: a view of the compiled model that shares every
float32 tensor and every packed weight and casts the rest. Packed weights keep their format
(``keeps_format`` modules: codes and float16 scales as stored). The lowering is checked
against this view, which computes what the file computes; how far the view is from the
model in its own dtype is reported beside it.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from presso.graph import Graph
from presso.numerics import float_dtype, rel_error
from presso.signature import Inputs

LOWERED_DTYPE = torch.float32


HOST = torch.device("cpu")


def needs_cast(module: nn.Module) -> bool:
    return (any(t.is_floating_point() and t.dtype != LOWERED_DTYPE for t in _float_tensors(module))
            or any(t.device != HOST for t in (*module.parameters(), *module.buffers())))


def float32_view(module: nn.Module) -> nn.Module:
    """``module`` itself when it is all float32 on the host, else a copy with its other float
    tensors cast (and, for a model on a GPU, every tensor on the host: ONNX Runtime's CPU
    kernels are what the file is checked in)."""
    if not needs_cast(module):
        return module
    memo: dict[int, object] = {}
    cast_ids = {id(t) for t in _float_tensors(module) if t.dtype != LOWERED_DTYPE}
    for t in (*module.parameters(), *module.buffers()):
        if id(t) not in cast_ids and t.device == HOST:
            memo[id(t)] = t  # shared, not copied
            continue
        moved = t.detach().to(HOST, LOWERED_DTYPE if id(t) in cast_ids else t.dtype)
        memo[id(t)] = nn.Parameter(moved, requires_grad=False) if isinstance(t, nn.Parameter) else moved
    view = copy.deepcopy(module, memo)
    for m in view.modules():
        if hasattr(m, "out_dtype"):
            m.out_dtype = LOWERED_DTYPE
    return view.eval()


def lowering_graph(graph: Graph) -> Graph:
    """``graph`` over :func:`float32_view` of its module: what the ONNX file is traced from."""
    view = float32_view(graph.module)
    if view is graph.module:
        return graph
    inputs = graph.example_inputs
    host = Inputs(tuple(t.to(HOST) for t in inputs.args), {k: v.to(HOST) for k, v in inputs.kwargs.items()})
    return Graph(view, graph.spec, host, graph.dynamic)


def precision_report(graph: Graph, lowered: Graph) -> dict:
    """The lowered dtype and, for a cast model, how far the view's outputs are from the model's."""
    out = {"model_dtype": str(float_dtype(graph.module)).replace("torch.", ""),
           "lowered_dtype": str(LOWERED_DTYPE).replace("torch.", "")}
    if lowered is not graph:
        out["rel_error_vs_model"] = rel_error(graph.run(), lowered.run())
    return out


def _float_tensors(module: nn.Module):
    packed = {id(t) for m in module.modules() if getattr(m, "keeps_format", False) for t in m.buffers()}
    for t in (*module.parameters(), *module.buffers()):
        if t.is_floating_point() and id(t) not in packed:
            yield t
