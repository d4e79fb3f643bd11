"""``quantize_dynamic_int8``: int8 weights per output channel, activations quantized at run time.

Policy: every linear layer the traced graph calls, minus ``skip`` patterns.
Mechanism: swap each for :class:`presso.runtime.int8.DynamicInt8Linear`, lowered to ONNX
``MatMulInteger`` (an integer matmul in ONNX Runtime). Activations default to one scale per
token: LLM activations carry outlier tokens that a single per-tensor scale cannot absorb.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from presso.graph import Graph, replace_module
from presso.pass_api import Context, Pass, PassConfig, PassResult
from presso.passes.common import is_linear, linear_weight, matches
from presso.runtime.int8 import DynamicInt8Linear


@dataclass(frozen=True, kw_only=True)
class DynamicInt8Config(PassConfig):
    skip: tuple[str, ...] = ()  # glob patterns on module paths, e.g. ("lm_head", "*.0.*")
    activations: Literal["per_token", "per_tensor"] = "per_token"


def select_linears(graph: Graph, skip: tuple[str, ...]) -> tuple[dict[str, nn.Module], list[str]]:
    """Linear layers called in the trace, split into (chosen, skipped paths)."""
    chosen, skipped = {}, []
    for path, module in graph.called_modules().items():
        if not is_linear(module):
            continue
        if matches(path, skip):
            skipped.append(path)
        else:
            chosen[path] = module
    return chosen, skipped


def tied_to_others(root: nn.Module, chosen: dict[str, nn.Module]) -> list[str]:
    """Paths of chosen linears whose weight is also used by a module outside the chosen set."""
    chosen_ids = {id(m) for m in chosen.values()}
    elsewhere = {p.data_ptr() for m in root.modules() if id(m) not in chosen_ids for p in m.parameters(recurse=False)}
    return [path for path, m in chosen.items() if m.weight.data_ptr() in elsewhere]


class QuantizeDynamicInt8(Pass):
    name = "quantize_dynamic_int8"
    Config = DynamicInt8Config
    summary = "Linear weights to int8 per channel; activations quantized dynamically (ONNX integer matmul)."
    provides = frozenset({"quantized"})
    max_rel_error = 0.15  # 8-bit per-tensor activations on every layer, accumulated over the model

    def run(self, graph: Graph, ctx: Context) -> PassResult:
        chosen, skipped = select_linears(graph, self.config.skip)
        untied = tied_to_others(graph.module, chosen)
        bytes_before = bytes_after = 0
        for path, module in chosen.items():
            weight, bias = linear_weight(module)
            new = DynamicInt8Linear.from_weight(weight, bias, per_token=self.config.activations == "per_token")
            replace_module(graph.module, path, new)
            bytes_before += weight.numel() * weight.element_size()
            bytes_after += new.weight_t.numel() + new.weight_scale.numel() * 4
        # a weight tied to an embedding gets its own int8 copy; the float table stays for lookups
        stats = {"quantized": len(chosen), "skipped": skipped, "untied": untied,
                 "weight_bytes_before": bytes_before, "weight_bytes_after": bytes_after}
        return PassResult(graph, modified=bool(chosen), stats=stats)
