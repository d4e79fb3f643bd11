"""Built-in backends: ``lower(graph) -> run(*tensors) -> tuple[Tensor, ...]``."""
from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from presso.graph import Graph
from presso.numerics import float_dtype
from presso.plugins.registry import get_registry
from presso.runtime.onnx_export import write_onnx
from presso.runtime.ort_model import OrtModel
from presso.runtime.precision import LOWERED_DTYPE, lowering_graph

Runner = Callable[..., tuple[torch.Tensor, ...]]


def lower_torch(graph: Graph) -> Runner:
    """Eager PyTorch on the rewritten module (presso ops run their torch reference)."""
    traceable = graph.traceable()

    @torch.no_grad()
    def run(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return traceable(*tensors)

    return run


def lower_onnxruntime(graph: Graph) -> Runner:
    """Export to a private temporary ONNX file and run it in an ONNX Runtime session."""
    workdir = tempfile.TemporaryDirectory(prefix="presso-ort-")
    path = Path(workdir.name) / "model.onnx"
    write_onnx(lowering_graph(graph), path, get_registry().onnx_lowerings)  # float32 for a half model
    model = OrtModel(path, graph.spec)
    model.workdir = workdir  # lives as long as the session that may read external data from it
    dtype = float_dtype(graph.module)
    if dtype == LOWERED_DTYPE:
        return model.run_flat

    def run(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:  # outputs in the model's own dtype
        return tuple(t.to(dtype) if t.is_floating_point() else t for t in model.run_flat(*tensors))

    run.model = model
    return run


def lower_triton(graph: Graph) -> Runner:
    """Quantized linears through presso's Triton kernels on the GPU; everything else stays torch.

    Runs a CUDA copy of the rewritten module (the graph's own stays where it is, for export);
    inputs are moved to the GPU and outputs back to the inputs' device.
    """
    import copy

    from presso.runtime.triton import check_available

    check_available()
    from presso.runtime.triton.modules import to_triton
    from presso.signature import Traceable

    module = copy.deepcopy(graph.module)
    swapped = to_triton(module)
    traceable = Traceable(module.cuda(), graph.spec)

    @torch.no_grad()
    def run(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        device = tensors[0].device if tensors else torch.device("cpu")
        return tuple(t.to(device) for t in traceable(*(t.cuda() for t in tensors)))

    run.module, run.swapped = module, swapped
    return run
