"""``quantize_weights``: weight-only int4/int8, group-wise, by RTN, GPTQ or AWQ.

Policy: every linear the traced graph calls, minus ``skip``; optionally the embedding
tables (a tied lm_head then reads the same packed table); optionally the
``keep_sensitive`` layers whose outputs move most stay at ``sensitive_bits``.
Mechanism: :class:`presso.runtime.nbits.WeightOnlyLinear`, lowered to ONNX Runtime's
``MatMulNBits``. GPTQ and AWQ calibrate one repeated block at a time
(:mod:`presso.passes.common.blocks`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from presso import distributed
from presso.errors import ConfigError
from presso.graph import Graph, replace_module
from presso.pass_api import Context, Pass, PassConfig, PassResult
from presso.passes.common.blocks import (
    blocks_replayed,
    call_bytes,
    find_blocks,
    memory_in_use,
    peak_rss_bytes,
    walk_blocks,
)
from presso.passes.common.modules import linear_weight, select_linears, without_tied
from presso.passes.common.scale_groups import apply_scales, find_scale_groups
from presso.passes.common.sensitivity import layer_errors, most_sensitive
from presso.passes.common.stats import SharedInputStats, all_reduce_stats
from presso.passes.quantization import awq
from presso.passes.quantization.gptq import gptq_quantize, group_level, refit_scales
from presso.runtime.nbits import PackedWeight, WeightOnlyEmbedding, WeightOnlyLinear
from presso.runtime.quant import QuantizedWeight, WeightFormat, quantize_weight


@dataclass(frozen=True, kw_only=True)
class QuantizeWeightsConfig(PassConfig):
    bits: int = 4
    group_size: int = 128  # along the input dimension; -1: one scale per output channel
    symmetric: bool = True
    method: Literal["rtn", "gptq", "awq", "awq+gptq"] = "rtn"  # awq+gptq: AWQ scales, then GPTQ rounding
    skip: tuple[str, ...] = ()  # glob patterns on module paths, kept in float
    embeddings: Literal["none", "int8", "int4"] = "none"  # also quantize embedding tables
    keep_sensitive: int = 0  # this many most sensitive linears get sensitive_bits instead
    sensitive_bits: int = 8
    damp: float = 0.01  # GPTQ: Hessian damping, a fraction of its mean diagonal
    act_order: bool = False  # GPTQ: columns by decreasing Hessian diagonal
    scales: Literal["float16", "float32", "int8"] = "float16"  # how group scales are stored (int8: codes x row scale)
    refit: int = 2  # GPTQ/AWQ: rounds of re-solving group scales by least output error (GPTQ re-rounds between)
    # a linear sharing its weight (tied lm_head) without embeddings=: "keep" it float and shared
    tied: Literal["keep", "quantize"] = "keep"
    # GPTQ/AWQ: blocks in order, each calibrated on the inputs the already-rounded blocks give it
    # (and never the whole float model on the device); False: every linear at once on the float
    # model's inputs (the whole model held where it runs)
    sequential: bool = True

    def validate(self) -> None:
        for name in ("bits", "sensitive_bits"):
            if getattr(self, name) not in (4, 8):
                raise ConfigError(
                    f"{name}={getattr(self, name)} is not supported",
                    hint="use 4 or 8 (the widths ONNX Runtime's MatMulNBits runs)",
                )
        g = self.group_size
        if g != -1 and (g < 16 or g & (g - 1)):
            raise ConfigError(
                f"group_size={g} is not supported",
                hint="use a power of two of at least 16 (32, 64, 128, ...) or -1 for per channel",
            )
        if self.keep_sensitive < 0 or not 0 < self.damp < 1 or self.refit < 0:
            raise ConfigError("keep_sensitive and refit must be >= 0 and damp in (0, 1)")

    @property
    def expected_drift(self) -> float:
        # 4-bit weights on every layer of a random test model (real models move far less); 8-bit
        # weights carry 16x finer steps
        return 0.5 if 4 in (self.bits, self.sensitive_bits if self.keep_sensitive else self.bits) else 0.1

    @property
    def fmt(self) -> WeightFormat:
        return WeightFormat(self.bits, self.group_size, self.symmetric, SCALE_BITS[self.scales])

    @property
    def needs_calibration(self) -> bool:
        return self.method != "rtn" or self.keep_sensitive > 0


SCALE_BITS = {"float32": 32, "float16": 16, "int8": 8}


class QuantizeWeights(Pass):
    name = "quantize_weights"
    Config = QuantizeWeightsConfig
    summary = "Weight-only int4/int8 group-wise (RTN, GPTQ, AWQ), lowered to ONNX Runtime MatMulNBits."
    provides = frozenset({"quantized"})
    streams = True  # RTN: one linear's float weight at a time; GPTQ/AWQ: one block at a time

    def run(self, graph: Graph, ctx: Context) -> PassResult:
        cfg = self.config
        chosen, skipped = select_linears(graph, cfg.skip)
        if cfg.embeddings == "none":  # with packed embeddings a tied linear reads the packed table
            chosen, kept_tied = without_tied(graph.module, chosen, cfg.tied)
        else:
            kept_tied = []
        stats: dict = {"method": cfg.method, "skipped": skipped, "kept_tied": kept_tied}
        embedded = quantize_embeddings(graph, chosen, cfg, stats) if cfg.embeddings != "none" else {}
        chosen = {p: m for p, m in chosen.items() if p not in embedded}
        formats = {p: cfg.fmt for p in chosen}
        batches = list(ctx.calibration or [])
        if cfg.keep_sensitive:
            graph.materialize(why="quantize_weights(keep_sensitive=...), which compares every layer")
            kept = keep_sensitive(graph, chosen, cfg, batches)
            formats.update({p: replace(cfg.fmt, bits=cfg.sensitive_bits) for p in kept})
            stats["kept_at_sensitive_bits"] = kept
        start = time.perf_counter()
        if cfg.method == "rtn":
            for path, module in chosen.items():
                graph.materialize(module)
                weight, bias = linear_weight(module)
                replace_module(graph.module, path, WeightOnlyLinear.quantize(weight, bias, formats[path]))
                del weight, bias
                graph.release(module)
        else:
            stats.update(calibrate_and_quantize(graph, chosen, formats, batches, cfg))
        stats["quantize_seconds"] = round(time.perf_counter() - start, 2)
        stats["quantized"] = len(chosen)
        stats["weight_bytes"] = sum(formats[p].bytes_for(*linear_weight(m)[0].shape) for p, m in chosen.items())
        return PassResult(graph, modified=bool(chosen or embedded), stats=stats)


def quantize_embeddings(
    graph: Graph, chosen: dict[str, nn.Module], cfg: QuantizeWeightsConfig, stats: dict
) -> set[str]:
    """Pack every called embedding table; linears tied to one read it too. Returns those linears."""
    # the pass's groups: a per-row scale would be stored once per MatMulNBits block anyway
    fmt = replace(cfg.fmt, bits=8 if cfg.embeddings == "int8" else 4)
    tied: set[str] = set()
    tables = {
        p: m for p, m in graph.called_modules().items() if type(m) is nn.Embedding
    }  # subclasses (learned positions) add logic
    for path, emb in tables.items():
        packed = PackedWeight(quantize_weight(emb.weight.detach(), fmt))
        replace_module(graph.module, path, WeightOnlyEmbedding(packed, emb.padding_idx, emb.weight.dtype))
        for lpath, linear in chosen.items():
            if isinstance(linear, nn.Linear) and linear.weight is emb.weight:
                replace_module(graph.module, lpath, WeightOnlyLinear(packed, linear.bias, tied=True))
                tied.add(lpath)
    stats["embeddings"] = {"tables": list(tables), "bits": fmt.bits, "tied_linears": sorted(tied)}
    return tied


def keep_sensitive(
    graph: Graph, chosen: dict[str, nn.Module], cfg: QuantizeWeightsConfig, batches: list
) -> dict[str, float]:
    def rtn(_path, module):
        weight, bias = linear_weight(module)
        return WeightOnlyLinear.quantize(weight, bias, cfg.fmt)

    return most_sensitive(layer_errors(graph, chosen, rtn, batches), cfg.keep_sensitive)


def calibrate_and_quantize(
    graph: Graph,
    chosen: dict[str, nn.Module],
    formats: dict[str, WeightFormat],
    batches: list,
    cfg: QuantizeWeightsConfig,
) -> dict:
    """GPTQ or AWQ, one block at a time, then the chosen linears outside the blocks on the
    whole model; returns stats (memory, AWQ alphas). Across processes each walks its share of
    ``batches`` (:mod:`presso.distributed`)."""
    batches = distributed.share(batches)
    groups = find_scale_groups(graph) if cfg.method.startswith("awq") else []
    memory = {"block_inputs_bytes": 0, "hessian_bytes": 0}
    alphas: dict[str, float] = {}
    inside: set[str] = set()
    blocks = [b for b, _ in find_blocks(graph.module)] if cfg.sequential else []
    if not cfg.sequential:
        graph.materialize(why="quantize_weights(sequential=False), which calibrates the whole model at once")
    seconds, finals = [], []
    steps = tqdm(walk_blocks(graph, batches, finals) if blocks else (), desc=f"quantize_weights ({cfg.method})",
                 unit="block", total=len(blocks) or 1, leave=False, disable=not distributed.is_main())
    for step in steps:
        started = time.perf_counter()
        mine = {p: m for p, m in chosen.items() if p.startswith(step.path + ".")}
        inside |= set(mine)
        if mine:
            memory["block_inputs_bytes"] = max(memory["block_inputs_bytes"], call_bytes(step.calls))
            _calibrate(graph, mine, lambda c: step.run(c.new_batch), groups, formats, cfg, memory, alphas)
        seconds.append(round(time.perf_counter() - started, 3))
        steps.set_postfix_str(memory_in_use(graph.device))
    # a resumed run skipped the blocks it had finished: their linears are done too
    rest = {p: m for p, m in chosen.items() if p not in inside and not any(p.startswith(b + ".") for b in blocks)}
    if rest and finals:  # the head after the blocks: fed the walk's last outputs, on the device
        with blocks_replayed(graph, blocks, finals[0], graph.device, stop_after=rest.values()) as run_batch:
            _calibrate(graph, rest, lambda c: _each_batch(c, run_batch, batches), groups, formats, cfg, memory,
                       alphas)
    elif rest:
        _calibrate(graph, rest, lambda c: _each_batch(c, graph.run, batches), groups, formats, cfg, memory, alphas)
    for outputs in finals:
        outputs.release()
    memory["process_peak_rss_bytes"] = peak_rss_bytes()
    if graph.device.type == "cuda":
        memory["device_peak_bytes"] = torch.cuda.max_memory_allocated(graph.device)
    return {"calibration_batches": distributed.reduce_count(len(batches)), "processes": distributed.world_size(),
            "awq_alpha": alphas, "calibration_memory": memory,
            "device": str(graph.device), "block_seconds": seconds}


def _each_batch(collector: SharedInputStats, run: Callable, batches: list) -> None:
    for inputs in batches:
        collector.new_batch()
        run(inputs)


def _calibrate(
    graph: Graph,
    linears: dict[str, nn.Module],
    run: Callable,
    groups: list,
    formats: dict[str, WeightFormat],
    cfg: QuantizeWeightsConfig,
    memory: dict,
    alphas: dict,
) -> None:
    """Input statistics of ``linears`` from ``run(collector)``, AWQ scales, then each quantized.
    Across processes the statistics are summed over ranks and the linears divided among them."""
    with SharedInputStats(linears) as collector, distributed.guard(f"calibration of {next(iter(linears))}"):
        run(collector)
    stats = collector.stats
    all_reduce_stats(stats.values())
    unique = {id(s): s for s in stats.values()}.values()
    memory["hessian_bytes"] = max(memory["hessian_bytes"], sum(s.xtx.numel() * 8 for s in unique))
    if groups:  # the same search on every rank, from the same summed statistics
        alphas.update(_awq_scales(graph, linears, groups, collector, formats))

    def solve(path: str) -> list[torch.Tensor]:
        weight = linear_weight(linears[path])[0]
        q = in_row_chunks(lambda w: _round(w, stats[path].hessian, formats[path], cfg), weight)
        return [q.codes, q.scales, q.zeros]

    def apply(path: str, solved: list[torch.Tensor]) -> None:
        module = linears[path]
        weight, bias = linear_weight(module)
        q = QuantizedWeight(*solved, formats[path], weight.shape[1])
        replace_module(graph.module, path, WeightOnlyLinear(PackedWeight(q), bias))
        del weight, bias
        graph.release(module)

    distributed.divided(list(linears), solve, apply, graph.device, "rounding")


def _round(weight: torch.Tensor, h: torch.Tensor, fmt: WeightFormat, cfg: QuantizeWeightsConfig) -> QuantizedWeight:
    """GPTQ or AWQ's clipped rounding of ``weight`` against Hessian ``h``, then the scale refits."""
    if cfg.method in ("gptq", "awq+gptq"):
        q = gptq_quantize(weight, h, fmt, damp=cfg.damp, act_order=cfg.act_order)
    else:
        q = awq.clip_quantize(weight.float(), h, fmt)
    for round_ in range(cfg.refit):
        if round_ and cfg.method != "awq":  # re-round with error feedback to the refitted scales
            q = gptq_quantize(weight, h, fmt, damp=cfg.damp, act_order=cfg.act_order, fixed=group_level(q))
        q = refit_scales(weight, q, h)
    return q


ROW_CHUNK_BYTES = 1 << 29  # float32 rows rounded at once; GPTQ and the refit hold several copies


def in_row_chunks(round_rows: Callable[[torch.Tensor], QuantizedWeight], weight: torch.Tensor) -> QuantizedWeight:
    """``round_rows`` over slices of rows: every step (scales, error feedback, refit) is per
    row given the Hessian, so the result is the same, and a 128k-row head holds a slice's
    copies at a time, not the whole matrix's (about 12 GB for an 8B model's head)."""
    rows = max(1, ROW_CHUNK_BYTES // (4 * weight.shape[1]))
    if weight.shape[0] <= rows:
        return round_rows(weight)
    parts = [round_rows(weight[i : i + rows]) for i in range(0, weight.shape[0], rows)]
    first = parts[0]
    return QuantizedWeight(torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]),
                           torch.cat([p.zeros for p in parts]), first.fmt, first.in_features)


def _awq_scales(
    graph: Graph, linears: dict[str, nn.Module], groups, collector: SharedInputStats, formats: dict[str, WeightFormat]
) -> dict[str, float]:
    """Search and fold AWQ scales for the scale groups whose consumers are all in ``linears``."""
    alphas = {}
    for group in groups:
        if not all(c in linears for c in group.consumers):
            continue
        stats = collector.stats[group.consumers[0]]
        weights = [linear_weight(linears[c])[0].float() for c in group.consumers]
        s, alpha = awq.search_scales(weights, stats.hessian, stats.mean_abs, formats[group.consumers[0]])
        apply_scales(graph.module, group, s)
        for inputs in {id(collector.stats[c]): collector.stats[c] for c in group.consumers}.values():
            inputs.rescale(s)  # the consumers now see inputs divided by s
        alphas[group.producer] = round(alpha, 3)
    return alphas
