"""``quantize_static_int8``: W8A8 with calibrated activation ranges (Q/DQ insertion).

Policy: every linear (and, with ``convs``, every zero-padded ``Conv2d``) the traced graph
calls, minus ``skip``, minus the ``keep_sensitive`` layers whose outputs move most (kept
in float). Linears matching ``dynamic`` also get per-token activation scales computed at run time:
still int8 x int8, for inputs whose outlier tokens no single calibrated range fits (an
LLM's ``down_proj``). Mechanism: an observer per layer input over the calibration batches, then
:class:`presso.runtime.qdq.StaticInt8Linear`/``StaticInt8Conv2d``: Q/DQ on the input and an
int8 per-channel weight, which ONNX Runtime fuses into integer kernels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from presso.errors import ConfigError
from presso.graph import Graph, replace_module
from presso.pass_api import Context, Pass, PassConfig, PassResult
from presso.passes.common.capture import inputs_of
from presso.passes.common.modules import is_linear, linear_weight, matches, without_tied
from presso.passes.common.sensitivity import layer_errors, most_sensitive
from presso.passes.quantization.observers import RangeObserver
from presso.runtime.int8 import DynamicInt8Linear
from presso.runtime.qdq import ActivationQuant, StaticInt8Conv2d, StaticInt8Linear


@dataclass(frozen=True, kw_only=True)
class StaticInt8Config(PassConfig):
    # mse: the range with the least quantization error of the calibration activations (best
    # measured on SmolLM2: +0.9% perplexity in the W8A8 recipe)
    observer: Literal["minmax", "percentile", "mse"] = "mse"
    percentile: float = 99.99  # for observer="percentile"
    activations: Literal["asymmetric", "symmetric"] = "asymmetric"  # uint8 with zero point, or int8
    convs: bool = True
    skip: tuple[str, ...] = ("lm_head",)  # the output layer: large and the most sensitive
    keep_sensitive: int = 0  # this many most sensitive layers stay in float
    # glob patterns: linears with per-token dynamic activation scales; an LLM's down_proj reads
    # the MLP's outlier tokens, which no single calibrated range fits
    dynamic: tuple[str, ...] = ("*down_proj",)
    tied: Literal["keep", "quantize"] = "keep"  # a linear sharing its weight (tied lm_head): keep it float

    @property
    def expected_drift(self) -> float:
        return 0.3  # calibrated per-tensor 8-bit activations on every layer of a random test model

    def validate(self) -> None:
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile={self.percentile} must be in (50, 100]", hint="e.g. 99.99")
        if self.keep_sensitive < 0:
            raise ConfigError("keep_sensitive must be >= 0")


def quantizable(module: nn.Module, convs: bool) -> bool:
    if is_linear(module):
        return True
    return convs and isinstance(module, nn.Conv2d) and module.padding_mode == "zeros"


class QuantizeStaticInt8(Pass):
    name = "quantize_static_int8"
    Config = StaticInt8Config
    summary = "W8A8: calibrated per-tensor activation Q/DQ and int8 per-channel weights (ONNX QDQ)."
    requires = frozenset({"calibration"})
    provides = frozenset({"quantized"})

    def run(self, graph: Graph, ctx: Context) -> PassResult:
        cfg = self.config
        called = graph.called_modules()
        chosen = {p: m for p, m in called.items() if quantizable(m, cfg.convs) and not matches(p, cfg.skip)}
        chosen, kept_tied = without_tied(graph.module, chosen, cfg.tied)
        skipped = [p for p, m in called.items() if quantizable(m, cfg.convs) and p not in chosen]
        dynamic = {p: m for p, m in chosen.items() if is_linear(m) and matches(p, cfg.dynamic)}
        chosen = {p: m for p, m in chosen.items() if p not in dynamic}
        acts = self._calibrate(graph, chosen, ctx)
        stats: dict = {"observer": cfg.observer, "skipped": skipped, "kept_tied": kept_tied}
        if cfg.keep_sensitive:
            errors = layer_errors(graph, chosen, lambda p, m: replacement(m, acts[p]), list(ctx.calibration))
            kept = most_sensitive(errors, cfg.keep_sensitive)
            chosen = {p: m for p, m in chosen.items() if p not in kept}
            stats["kept_in_float"] = kept
        for path, module in chosen.items():
            replace_module(graph.module, path, replacement(module, acts[path]))
        for path, module in dynamic.items():
            replace_module(graph.module, path, DynamicInt8Linear.from_weight(*linear_weight(module)))
        stats["quantized"] = len(chosen)
        stats["dynamic"] = sorted(dynamic)
        return PassResult(graph, modified=bool(chosen or dynamic), stats=stats)

    @torch.no_grad()
    def _calibrate(self, graph: Graph, chosen: dict[str, nn.Module], ctx: Context) -> dict[str, ActivationQuant]:
        cfg = self.config
        symmetric = cfg.activations == "symmetric"
        observers = {p: RangeObserver(cfg.observer, cfg.percentile, symmetric) for p in chosen}
        with inputs_of(chosen, lambda p, x: observers[p].update(x)):
            for inputs in ctx.calibration_batches(desc="quantize_static_int8: calibration"):
                graph.run(inputs)
        return {p: ActivationQuant(*obs.params(), symmetric) for p, obs in observers.items()}


def replacement(module: nn.Module, act: ActivationQuant) -> nn.Module:
    if isinstance(module, nn.Conv2d):
        return StaticInt8Conv2d(module, act)
    weight, bias = linear_weight(module)
    return StaticInt8Linear(weight, bias, act)
