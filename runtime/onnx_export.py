"""Lower a compiled :class:`presso.Graph` to an ONNX file with ``torch.onnx`` (dynamo).

Custom ops inserted by passes are translated with the ONNX lowerings in the registry.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import onnx
import torch

from presso.errors import ExportError
from presso.graph import Graph

EXTERNAL_DATA_BYTES = 1 << 30  # beyond this, weights go to a side file (protobuf caps at 2 GiB)


def output_names(graph: Graph) -> list[str]:
    spec = graph.spec
    if spec.output_kind == "mapping":
        return list(spec.output_keys)
    n = len(graph.run())
    return ["output"] if spec.output_kind == "tensor" else [f"output_{i}" for i in range(n)]


@contextlib.contextmanager
def _quiet():
    # the exporter logs a line per missing optional op library (torchvision); not the user's concern
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def tidy(model) -> None:
    """Cheap clean-ups; ONNX Runtime does the heavy graph optimisation when it loads the file.

    (The exporter's own optimizer takes minutes on a 30-layer LLM for little gain.) Weight
    transposes are folded so every linear is a ``MatMul`` on an initializer, the form other
    tools (ONNX Runtime's quantizers among them) expect.
    """
    import onnx_ir.passes.common as common
    from onnxscript.optimizer import fold_constants

    fold_constants(model, onnx_shape_inference=False, input_size_limit=1 << 40, output_size_limit=1 << 40,
                   should_fold=_is_private_transpose)
    common.CommonSubexpressionEliminationPass()(model)
    common.RemoveUnusedNodesPass()(model)


def _is_private_transpose(node) -> bool:
    """A Transpose that alone reads its input: folding a shared one (a tied embedding) would copy it."""
    return node.op_type == "Transpose" and len(node.inputs[0].uses()) == 1


def write_onnx(graph: Graph, path: Path, lowerings: dict) -> None:
    """Write ``graph`` (plain call signature) to ``path``; checked by ``onnx.checker``."""
    write_program(graph.exported, list(graph.spec.input_names), output_names(graph), path, lowerings,
                  model_name=type(graph.module).__name__)


def write_program(program: torch.export.ExportedProgram, input_names: list[str], outputs: list[str],
                  path: Path, lowerings: dict, model_name: str) -> None:
    """ONNX-export a traced program to ``path`` (and ``path.data`` when large)."""
    try:
        with _quiet():
            onnx_program = torch.onnx.export(program, dynamo=True, verbose=False, optimize=False,
                                             custom_translation_table=dict(lowerings),
                                             input_names=input_names, output_names=outputs)
        tidy(onnx_program.model)
        for node in onnx_program.model.graph.all_nodes():
            node.metadata_props.clear()  # per-node source traces; they would dwarf small models
        weight_bytes = sum(t.numel() * t.element_size() for t in program.state_dict.values())
        onnx_program.save(str(path), external_data=weight_bytes > EXTERNAL_DATA_BYTES)
        onnx.checker.check_model(str(path))
    except Exception as exc:  # noqa: BLE001 - one readable error for every exporter failure
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ExportError(f"ONNX export of {model_name} failed: {type(exc).__name__}: {first}",
                          hint="an op without an ONNX lowering needs presso_register_onnx_lowerings") from exc
