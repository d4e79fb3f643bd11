"""Running calibration data through a model, one repeated block at a time.

Layer-by-layer calibration (GPTQ, AWQ) keeps only one block's inputs and the Hessians of
its linears in memory: the inputs of block ``i + 1`` are the outputs of block ``i`` after
it was quantized, so each block corrects for the errors of the blocks before it. A model
without a stack of repeated blocks is treated as one block fed the calibration inputs.
"""
from __future__ import annotations

import resource
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from presso.graph import Graph
from presso.passes.common import is_linear, linear_weight
from presso.signature import Inputs


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted inputs are captured."""


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The longest ``ModuleList`` of same-type modules holding linears (decoder/encoder layers)."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, m in model.named_modules():
        if (isinstance(m, nn.ModuleList) and len(m) >= 2 and len({type(c) for c in m}) == 1
                and any(is_linear(x) for x in m[0].modules()) and (best is None or len(m) > len(best[1]))):
            best = (name, m)
    return [(f"{best[0]}.{i}", b) for i, b in enumerate(best[1])] if best else []


@dataclass
class Call:
    """One recorded call of a block: positional and keyword arguments."""

    args: tuple
    kwargs: dict

    def with_hidden(self, hidden: torch.Tensor) -> "Call":
        return Call((hidden, *self.args[1:]), self.kwargs)


@torch.no_grad()
def capture_calls(graph: Graph, block: nn.Module, batches: list[Inputs]) -> list[Call]:
    """The arguments ``block`` receives for each calibration batch (the model stops there)."""
    calls: list[Call] = []

    def hook(_mod, args, kwargs):
        calls.append(Call(args, kwargs))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for inputs in batches:
            try:
                graph.run(inputs)
            except _Stop:
                pass
    finally:
        handle.remove()
    return calls


@torch.no_grad()
def run_block(block: nn.Module, call: Call) -> torch.Tensor:
    out = block(*call.args, **call.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def group_by_input(modules: dict[str, nn.Module], forward: Callable[[], object]) -> list[list[str]]:
    """``modules`` (by path) grouped by the tensor they read in one ``forward()``, groups in
    the order they first run; a module that did not run is a group of its own, at the end."""
    groups: dict[tuple, list[str]] = {}
    alive = []  # inputs held until the end, so that no later tensor reuses an address

    def hook(path):
        def record(_m, args):
            alive.append(args[0])
            if not any(path in g for g in groups.values()):
                groups.setdefault((args[0].data_ptr(), tuple(args[0].shape)), []).append(path)
        return record

    handles = [m.register_forward_pre_hook(hook(p)) for p, m in modules.items()]
    try:
        forward()
    finally:
        for h in handles:
            h.remove()
    seen = [p for g in groups.values() for p in g]
    return list(groups.values()) + [[p] for p in modules if p not in seen]


class InputStats:
    """``X^T X`` and the mean absolute value per input channel of one linear's inputs."""

    def __init__(self, k: int):
        self.xtx = torch.zeros(k, k, dtype=torch.float64)
        self.abs_sum = torch.zeros(k, dtype=torch.float64)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.xtx += x.t() @ x  # float32 per batch (fast), float64 across batches (no drift)
        self.abs_sum += x.abs().sum(0)
        self.rows += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        """Mean ``x x^T`` over calibration tokens (GPTQ's H up to a factor 2)."""
        return (self.xtx / max(self.rows, 1)).float()

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.rows, 1)).float()

    def rescale(self, s: torch.Tensor) -> None:
        """Inputs divided by ``s`` per channel (scales folded into the producer)."""
        s = s.double()
        self.xtx /= s[:, None] * s[None, :]
        self.abs_sum /= s


@dataclass
class StatsCollector:
    """Forward hooks gathering :class:`InputStats` for linears; linears fed the same tensor share one."""

    linears: dict[str, nn.Module]
    stats: dict[str, InputStats] = field(default_factory=dict)
    _owner: dict[str, str] = field(default_factory=dict)
    _seen: dict[tuple, str] = field(default_factory=dict)

    def __enter__(self) -> "StatsCollector":
        self._handles = [m.register_forward_pre_hook(self._hook(path)) for path, m in self.linears.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    def new_batch(self) -> None:
        self._seen.clear()

    def _hook(self, path: str) -> Callable:
        def hook(_mod, args):
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape))
            if path not in self.stats:
                first = self._seen.get(key)
                self.stats[path] = self.stats[first] if first else InputStats(x.shape[-1])
                self._owner[path] = first or path
            if self._owner[path] == path:
                self.stats[path].add(x)
                self._seen[key] = path
        return hook

    def shared_by(self, path: str) -> list[str]:
        """Linears whose stats object is the one of ``path``."""
        return [p for p, s in self.stats.items() if s is self.stats[path]]


@dataclass
class Segment:
    """Linears calibrated together; ``run(collector)`` feeds every calibration batch through them once."""

    name: str
    linears: dict[str, nn.Module]
    run: Callable[[StatsCollector], None]
    input_bytes: int = 0


def segments(graph: Graph, chosen: dict[str, nn.Module], batches: list[Inputs]) -> Iterator[Segment]:
    """Blocks in order, then the whole model for chosen linears outside the blocks (if any).

    The caller quantizes a segment's linears before asking for the next one: the next
    block's inputs are computed by the block as it is then.
    """
    blocks = find_blocks(graph.module)
    inside: set[str] = set()
    calls = capture_calls(graph, blocks[0][1], batches) if blocks else []
    for path, block in blocks:
        mine = {p: m for p, m in chosen.items() if p.startswith(path + ".")}
        inside |= set(mine)

        def run(collector, block=block, calls=calls):
            for call in calls:
                collector.new_batch()
                run_block(block, call)

        if mine:
            yield Segment(path, mine, run, call_bytes(calls))
        calls = [c.with_hidden(run_block(block, c)) for c in calls]
    rest = {p: m for p, m in chosen.items() if p not in inside}
    if rest:
        def run_model(collector):
            for inputs in batches:
                collector.new_batch()
                graph.run(inputs)

        yield Segment("model", rest, run_model)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def call_bytes(calls: list[Call]) -> int:
    return sum(t.numel() * t.element_size() for c in calls for t in (*c.args, *c.kwargs.values())
               if isinstance(t, torch.Tensor))


def weight_of(module: nn.Module) -> torch.Tensor:
    return linear_weight(module)[0].float()
