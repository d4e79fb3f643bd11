"""presso's own plugin: built-in passes, backends and ONNX lowerings, through the public hooks."""
from __future__ import annotations

import torch

from presso.plugins.hookspecs import hookimpl


@hookimpl
def presso_register_passes(registrar) -> None:
    from presso.passes.quantize_dynamic_int8 import QuantizeDynamicInt8

    registrar.add_pass(QuantizeDynamicInt8)


@hookimpl
def presso_register_backends(registrar) -> None:
    from presso.runtime.backends import lower_onnxruntime, lower_torch

    registrar.add_backend("torch", lower_torch)
    registrar.add_backend("onnxruntime", lower_onnxruntime)


@hookimpl
def presso_register_onnx_lowerings(registrar) -> None:
    from presso.runtime import int8

    registrar.add_onnx_lowering(torch.ops.presso.dynamic_int8_linear.default, int8.dynamic_int8_linear_onnx)
    registrar.add_onnx_lowering(torch.ops.presso.dynamic_int8_linear_per_token.default,
                                int8.dynamic_int8_linear_per_token_onnx)
