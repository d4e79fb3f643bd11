"""ONNX Runtime's contrib operators (``com.microsoft``) as onnxscript ops, so lowerings can call
them: onnx ships no schema for them, so each is declared here as far as presso uses it."""
from __future__ import annotations

import onnxscript
from onnx.defs import OpSchema

_ATTRIBUTE_TYPES = {"int": OpSchema.AttrType.INT, "float": OpSchema.AttrType.FLOAT}


def contrib_op(name: str, inputs: list[str], outputs: list[str], types: dict[str, str],
               attributes: dict[str, str]) -> onnxscript.values.Op:
    """``name`` with inputs and outputs as ``"name:T"`` (a trailing ``?`` makes one optional),
    ``types`` as ``{"T": "float"}`` and ``attributes`` as ``{"epsilon": "float"}``."""
    param, optional = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional

    def formal(spec: str) -> OpSchema.FormalParameter:
        named, kind = spec.rstrip("?").split(":")
        return param(named, kind, param_option=optional) if spec.endswith("?") else param(named, kind)

    schema = OpSchema(name, "com.microsoft", 1, inputs=[formal(i) for i in inputs],
                      outputs=[formal(o) for o in outputs],
                      type_constraints=[(t, [f"tensor({v})"], "") for t, v in types.items()],
                      attributes=[OpSchema.Attribute(n, _ATTRIBUTE_TYPES[t]) for n, t in attributes.items()])
    return onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), name, schema)
