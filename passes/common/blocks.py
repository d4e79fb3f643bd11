"""The block runner: a model walked one repeated block (decoder layer) at a time.

Layer-by-layer calibration (GPTQ, AWQ, sequential whitening) keeps only one block's inputs
and statistics in memory: the inputs of block ``i + 1`` are the outputs of block ``i`` after
the pass rewrote it, so each block corrects for the errors of the blocks before it. A model
without a stack of repeated blocks is treated as one block fed the calibration inputs.
"""
from __future__ import annotations

import contextlib
import resource
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils._pytree import tree_map

from presso import distributed
from presso.graph import Graph, replace_module
from presso.passes.common.activations import CallStore, activation_budget, call_size
from presso.passes.common.capture import before_calls, calls_of, inputs_of
from presso.passes.common.modules import is_linear
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

    def with_hidden(self, hidden: torch.Tensor) -> Call:
        return Call((hidden, *self.args[1:]), self.kwargs)

    def to(self, device: torch.device) -> Call:
        move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
        return Call(tree_map(move, self.args), tree_map(move, self.kwargs))


@torch.no_grad()
def capture_calls(graph: Graph, block: nn.Module, batches: list[Inputs], calls=None) -> list[Call]:
    """The arguments ``block`` receives for each calibration batch (the model stops there),
    appended to ``calls`` (a list, or a :class:`CallStore` that moves them to disk)."""
    calls = [] if calls is None else calls

    def record(args, kwargs):
        calls.append(Call(args, kwargs))
        raise _Stop

    with calls_of(block, record):
        for inputs in batches:
            try:
                graph.run(inputs)
            except _Stop:
                pass
    return calls


@torch.no_grad()
def run_block(block: nn.Module, call: Call) -> torch.Tensor:
    out = block(*call.args, **call.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class BlockStep:
    """One block of the walk: rewrite ``block`` in place; ``calls`` are its calibration inputs."""

    path: str
    block: nn.Module
    calls: list[Call]

    def run(self, each: Callable[[], None] | None = None) -> None:
        """Feed every calibration call through the block (``each()`` before each one)."""
        for call in self.calls:
            if each:
                each()
            run_block(self.block, call)


@dataclass
class BlockOutputs:
    """What the last block returned for each calibration batch, after the walk rewrote it."""

    calls: Sequence[Call]  # the inputs a next block would get (in memory or on disk)
    as_tuple: bool  # the blocks return ``(hidden, ...)`` rather than a tensor
    on_release: Callable[[], None] | None = None  # removes their files, if the walk made some

    def release(self) -> None:
        if self.on_release:
            self.on_release()


def walk_blocks(graph: Graph, batches: list[Inputs], finals: list[BlockOutputs] | None = None
                ) -> Iterator[BlockStep]:
    """The repeated blocks in order, each with the inputs the blocks before it produce *as the
    caller left them*: the next block's inputs are computed after the caller's loop body ran.
    Stop early with ``break``; the later blocks are then never run. A walk that reaches the end
    appends the last block's outputs to ``finals`` (for :func:`blocks_replayed`)."""
    blocks = find_blocks(graph.module)
    device = graph.device
    progress = graph.progress.current if graph.progress is not None else None
    done = progress.finished() if progress else -1
    spill = _Spill(progress, device, len(batches))
    if done >= 0:  # a run that stopped: its finished blocks come back from disk, not redone
        for index, (path, _) in enumerate(blocks[: done + 1]):
            replace_module(graph.module, path, progress.load(index, _home(graph.module)))
        blocks = [(path, graph.module.get_submodule(path)) for path, _ in blocks]
        calls = progress.load_calls(device)
        if isinstance(calls, CallStore):
            calls.device = device
    try:
        if done < 0:
            calls = capture_calls(graph, blocks[0][1], batches, spill.store(-1)) if blocks else []
        for index, (path, block) in enumerate(blocks):
            if index <= done:
                continue
            graph.materialize(block)  # weights still on disk are read here, one block at a time
            home = next((t.device for t in (*block.parameters(), *block.buffers())), device)
            block.to(device)  # the block's work runs on the compute device, then the block goes home
            if not getattr(calls, "on_disk", False):
                calls = [c.to(device) for c in calls]
            try:
                yield BlockStep(path, block, calls)
                outputs = spill.store(index)
                for c in calls:
                    hidden, as_tuple = _block_output(block, c)
                    outputs.append(c.with_hidden(hidden))
                calls = outputs if outputs.on_disk else outputs.memory
            finally:
                block.to(home)  # also when the caller stops the walk here
            if progress:
                progress.save(index, block, calls)
        if finals is not None and blocks and len(calls):
            if index <= done:  # every block came back from disk: one call tells how blocks return
                block = blocks[-1][1].to(device)
                as_tuple = _block_output(block, calls[0])[1]
                block.to(_home(graph.module))
            finals.append(BlockOutputs(calls, as_tuple, None if progress else spill.clean))
    finally:
        if progress is None and not finals:
            spill.clean()


class _Spill:
    """Where a walk's calibration inputs go past the budget: two generations of files (a block
    reads one while its outputs are written to the other), in the resume folder if there is one
    (a resumed run reads its saved inputs from there), else in a temporary folder."""

    def __init__(self, progress, device: torch.device, expected: int):
        self.root = progress.folder / f"activations{distributed.file_suffix()}" if progress else None
        self.device, self.expected = device, expected
        self.budget = activation_budget(device)
        self._temp: str | None = None

    def store(self, index: int) -> CallStore:
        if self.root is None:
            self._temp = self._temp or tempfile.mkdtemp(prefix="presso-activations-")
            self.root = Path(self._temp)
        folder = self.root / f"gen-{index % 2}"
        shutil.rmtree(folder, ignore_errors=True)  # the inputs of two blocks back, no longer needed
        return CallStore(folder, self.budget, self.device, self.expected)

    def clean(self) -> None:
        if self._temp:
            shutil.rmtree(self._temp, ignore_errors=True)


def _home(model: nn.Module) -> torch.device:
    """Where the model's weights live (a caller's model on a GPU stays there)."""
    return next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))


@torch.no_grad()
def _block_output(block: nn.Module, call: Call) -> tuple[torch.Tensor, bool]:
    out = block(*call.args, **call.kwargs)
    return (out[0], True) if isinstance(out, (tuple, list)) else (out, False)


@contextlib.contextmanager
def blocks_replayed(graph: Graph, paths: list[str], finals: BlockOutputs, device: torch.device,
                    stop_after: Iterable[nn.Module] = ()) -> Iterator[Callable]:
    """Inside, a forward run skips the blocks (each hands its hidden states on; the last returns
    what the walk left for the batch, in batch order) and everything outside the blocks
    (embeddings, final norm, head) sits on ``device``: the modules after the blocks calibrate on
    the device without running the model again. ``paths``: the blocks the walk went through.
    Yields ``run(inputs)``, which runs one batch and ends it once every module of ``stop_after``
    has been called (hooks registered before ``run`` still see their inputs): a head of a
    128k vocabulary need not compute 128k logits a token to be calibrated."""
    blocks = [graph.module.get_submodule(p) for p in paths]
    inside = {id(m) for b in blocks for m in b.modules()}
    if graph.weights is not None:
        graph.weights.load_outside_blocks()
    home = _home(graph.module)
    queue = (c.args[0] for c in finals.calls)
    wrap = (lambda h: (h,)) if finals.as_tuple else (lambda h: h)

    def passthrough(*args, **kwargs):
        return wrap(args[0] if args else kwargs["hidden_states"])

    def last(*args, **kwargs):
        return wrap(next(queue))

    def outside(to: torch.device) -> None:
        for m in graph.module.modules():
            if id(m) not in inside:
                m._apply(lambda t: t.to(to), recurse=False)

    for b in blocks:
        b.forward = passthrough
    blocks[-1].forward = last
    outside(device)
    move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731

    watched = list(stop_after)

    def run(inputs: Inputs) -> None:
        seen: set[int] = set()

        def reached(module, _args):
            seen.add(id(module))
            if len(seen) == len(watched):
                raise _Stop

        with before_calls(watched, reached):
            try:
                graph.run(Inputs(tree_map(move, inputs.args), tree_map(move, dict(inputs.kwargs))))
            except _Stop:
                pass

    try:
        yield run
    finally:
        for b in blocks:
            del b.forward
        outside(home)


@torch.no_grad()
def group_by_input(modules: dict[str, nn.Module], forward: Callable[[], object]) -> list[list[str]]:
    """``modules`` (by path) grouped by the tensor they read in one ``forward()``, groups in
    the order they first run; a module that did not run is a group of its own, at the end."""
    groups: dict[tuple, list[str]] = {}
    alive = []  # inputs held until the end, so that no later tensor reuses an address

    def record(path, x):
        alive.append(x)
        if not any(path in g for g in groups.values()):
            groups.setdefault((x.data_ptr(), tuple(x.shape)), []).append(path)

    with inputs_of(modules, record):
        forward()
    seen = [p for g in groups.values() for p in g]
    return list(groups.values()) + [[p] for p in modules if p not in seen]


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_in_use(device: torch.device) -> str:
    """For a progress bar: resident host memory now, and the device's where it is a GPU."""
    try:
        with open("/proc/self/statm") as f:
            host = int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        host = peak_rss_bytes()
    text = f"host {host / 1e9:.1f} GB"
    if device.type == "cuda":
        text += f", {device} {torch.cuda.memory_allocated(device) / 1e9:.1f} GB"
    return text


def call_bytes(calls: Sequence[Call]) -> int:
    if isinstance(calls, CallStore):
        return calls.nbytes
    return sum(call_size(c) for c in calls)
