"""presso's own plugin: built-in passes, backends and ONNX lowerings, through the public hooks."""
from __future__ import annotations

import torch

from presso.plugins.hookspecs import hookimpl


@hookimpl
def presso_register_passes(registrar) -> None:
    from presso.passes.head_sharing.share_attention_heads import ShareAttentionHeads
    from presso.passes.low_rank.split_low_rank import SplitLowRank
    from presso.passes.pruning.prune_structured import PruneStructured
    from presso.passes.quantization.quantize_dynamic_int8 import QuantizeDynamicInt8
    from presso.passes.quantization.quantize_static_int8 import QuantizeStaticInt8
    from presso.passes.quantization.quantize_weights import QuantizeWeights
    from presso.passes.quantization.rotate_residual import RotateResidual
    from presso.passes.quantization.smooth_quant import SmoothQuant

    for p in (PruneStructured, QuantizeDynamicInt8, QuantizeStaticInt8, QuantizeWeights, RotateResidual,
              ShareAttentionHeads, SmoothQuant, SplitLowRank):
        registrar.add_pass(p)


@hookimpl
def presso_register_importances(registrar) -> None:
    from presso.passes.pruning.importance import BUILTIN_IMPORTANCES

    for importance in BUILTIN_IMPORTANCES:
        registrar.add_importance(importance)


@hookimpl
def presso_register_adapters(registrar) -> None:
    from presso.passes.common.adapters import builtin_adapters

    for adapter in builtin_adapters():
        registrar.add_adapter(adapter)


@hookimpl
def presso_register_backends(registrar) -> None:
    from presso.runtime.backends import lower_onnxruntime, lower_torch, lower_triton

    registrar.add_backend("torch", lower_torch)
    registrar.add_backend("onnxruntime", lower_onnxruntime)
    registrar.add_backend("triton", lower_triton)


@hookimpl
def presso_register_onnx_lowerings(registrar) -> None:
    from presso.runtime import int8, nbits, qdq
    from presso.runtime.fused import attention, norms

    ops = torch.ops.presso
    for custom_op, lowering in (
        (ops.dynamic_int8_linear, int8.dynamic_int8_linear_onnx),
        (ops.dynamic_int8_linear_per_token, int8.dynamic_int8_linear_per_token_onnx),
        (ops.quantize_dequantize, qdq.quantize_dequantize_onnx),
        (ops.dequantize_per_channel, qdq.dequantize_per_channel_onnx),
        (ops.matmul_nbits, nbits.matmul_nbits_onnx),
        (ops.gather_nbits, nbits.gather_nbits_onnx),
        (ops.rms_norm, norms.rms_norm_onnx),
        (ops.skip_rms_norm, norms.skip_rms_norm_onnx),
        (ops.group_query_attention, attention.group_query_attention_onnx),
        (ops.group_query_attention_packed, attention.group_query_attention_packed_onnx),
    ):
        registrar.add_onnx_lowering(custom_op.default, lowering)
