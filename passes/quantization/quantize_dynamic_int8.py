"""``quantize_dynamic_int8``: int8 weights per output channel, activations quantized at run time.

Policy: every linear layer the traced graph calls, minus ``skip`` patterns.
Mechanism: swap each for :class:`presso.runtime.int8.DynamicInt8Linear`, lowered to ONNX
``MatMulInteger`` (an integer matmul in ONNX Runtime). Activations default to one scale per
token: LLM activations carry outlier tokens that a single per-tensor scale cannot absorb.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from presso.graph import Graph, replace_module
from presso.pass_api import Context, Pass, PassConfig, PassResult
from presso.passes.common.modules import linear_weight, select_linears, tied_to_others, without_tied
from presso.runtime.int8 import DynamicInt8Linear


@dataclass(frozen=True, kw_only=True)
class DynamicInt8Config(PassConfig):
    skip: tuple[str, ...] = ()  # glob patterns on module paths, e.g. ("lm_head", "*.0.*")
    activations: Literal["per_token", "per_tensor"] = "per_token"
    # a linear sharing its weight (a tied lm_head): "keep" it float and shared, or "quantize"
    # an int8 copy of it (the float table stays for the embedding lookups)
    tied: Literal["keep", "quantize"] = "keep"

    @property
    def expected_drift(self) -> float:
        # 8-bit activations on every layer of a random test model, accumulated over its depth;
        # one scale per tensor cannot absorb outlier tokens, so it moves twice as far
        return 0.15 if self.activations == "per_token" else 0.3


class QuantizeDynamicInt8(Pass):
    name = "quantize_dynamic_int8"
    Config = DynamicInt8Config
    summary = "Linear weights to int8 per channel; activations quantized dynamically (ONNX integer matmul)."
    provides = frozenset({"quantized"})
    streams = True  # one linear's float weight in memory at a time

    def run(self, graph: Graph, ctx: Context) -> PassResult:
        chosen, skipped = select_linears(graph, self.config.skip)
        chosen, kept_tied = without_tied(graph.module, chosen, self.config.tied)
        untied = tied_to_others(graph.module, chosen)
        bytes_before = bytes_after = 0
        for path, module in chosen.items():
            graph.materialize(module)
            weight, bias = linear_weight(module)
            new = DynamicInt8Linear.from_weight(weight, bias, per_token=self.config.activations == "per_token")
            replace_module(graph.module, path, new)
            graph.release(module)
            bytes_before += weight.numel() * weight.element_size()
            bytes_after += new.weight_t.numel() + new.weight_scale.numel() * 4
        stats = {"quantized": len(chosen), "skipped": skipped, "kept_tied": kept_tied, "untied": untied,
                 "weight_bytes_before": bytes_before, "weight_bytes_after": bytes_after}
        return PassResult(graph, modified=bool(chosen), stats=stats)
