"""Weights that arrive when they are needed: the working copy's parameters start on the meta
device and are read from a source (the caller's model, or safetensors files on disk) one
module at a time.

So the float model never exists twice: a pass that works block by block loads a block,
rewrites it (a quantized block is small) and goes on; a forward run (the manager's checks,
calibration inputs) streams each block that no pass has loaded yet: read, run, dropped.
A pass that needs every weight at once loads everything (``load_all``), the cost of a whole
copy, and is refused with the way out when that would not fit in memory.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from presso.errors import PressoError


class WeightSource(Protocol):
    def get(self, name: str) -> torch.Tensor:
        """A tensor the working copy may own (never the caller's own storage)."""


class ModuleSource:
    """The caller's model: each tensor copied when it is loaded, so the caller's stays untouched."""

    def __init__(self, model: nn.Module):
        self.tensors = dict(model.named_parameters(remove_duplicate=False))

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name].detach().clone()


def lazy_copy(model: nn.Module) -> tuple[nn.Module, LazyWeights]:
    """A copy of ``model`` whose parameters are on the meta device, read from ``model`` later.
    Buffers (rotary tables, running statistics) are small and copied at once."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    work = copy.deepcopy(model, memo)
    from presso.passes.common.blocks import find_blocks

    return work, LazyWeights(work, ModuleSource(model), [b for _, b in find_blocks(work)])


@dataclass
class _Entry:
    meta: nn.Parameter
    name: str  # what the source calls it (the first of its paths)
    owners: list[tuple[nn.Module, str]] = field(default_factory=list)  # every holder: tied weights stay tied
    live: nn.Parameter | None = None  # the streamed copy, while one is in place


class LazyWeights:
    """The meta parameters of ``root`` and where to read each one from."""

    def __init__(self, root: nn.Module, source: WeightSource, blocks: list[nn.Module],
                 device: torch.device | str | None = None):
        # None: each tensor stays where its source holds it (a caller's model on a GPU stays there)
        self.root, self.source, self.blocks = root, source, blocks
        self.device = None if device is None else torch.device(device)
        self.entries: dict[int, _Entry] = {}  # by id of the meta parameter
        for module_name, module in root.named_modules(remove_duplicate=False):
            for attr, p in module.named_parameters(recurse=False):
                if p.is_meta:
                    entry = self.entries.setdefault(id(p), _Entry(p, f"{module_name}.{attr}".lstrip(".")))
                    entry.owners.append((module, attr))
        self._live: dict[int, _Entry] = {}  # by id of the streamed parameter
        self._streaming = False

    def pending(self, module: nn.Module | None = None) -> list[_Entry]:
        """Entries of the parameters under ``module`` still on disk."""
        module = self.root if module is None else module
        seen = {id(p): p for p in module.parameters()}
        return [self.entries[k] for k in seen if k in self.entries]

    def pending_bytes(self, module: nn.Module | None = None) -> int:
        return sum(e.meta.numel() * e.meta.element_size() for e in self.pending(module))

    def load(self, module: nn.Module) -> int:
        """Read every parameter under ``module`` still on disk and keep it (a streamed copy in place
        is kept too). Returns the bytes read."""
        for p in module.parameters():
            entry = self._live.pop(id(p), None)
            if entry is not None:
                self.entries.pop(id(entry.meta), None)
        loaded = 0
        for entry in self.pending(module):
            loaded += self._install(entry).numel() * entry.meta.element_size()
            del self.entries[id(entry.meta)]
        return loaded

    def load_all(self, why: str) -> None:
        """Everything at once, for ``why``; refused when it would not fit in the memory free now."""
        need, free = self.pending_bytes(), available_memory()
        if need and free is not None and need > 0.9 * free:
            raise PressoError(f"{why} needs every weight in memory at once: {need / 1e9:.1f} GB, and "
                              f"{free / 1e9:.1f} GB are free",
                              hint="run it on a machine with more memory, or use passes that work block by "
                                   "block (quantize_weights, quantize_dynamic_int8) on this one")
        self.load(self.root)

    def _install(self, entry: _Entry) -> nn.Parameter:
        tensor = self.source.get(entry.name)
        if tuple(tensor.shape) != tuple(entry.meta.shape):
            raise PressoError(f"{entry.name}: the weights hold shape {tuple(tensor.shape)}, the model expects "
                              f"{tuple(entry.meta.shape)}", hint="the config does not match the weights")
        tensor = tensor.to(self.device or tensor.device, entry.meta.dtype)
        real = nn.Parameter(tensor, requires_grad=entry.meta.requires_grad)
        for module, attr in entry.owners:
            module._parameters[attr] = real
        return real

    @contextlib.contextmanager
    def all_meta(self) -> Iterator[None]:
        """Inside, every parameter and buffer is on the meta device: a trace of a partly loaded
        model (with meta inputs) sees one device; it reads shapes and dtypes only."""
        swapped: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        holders = []

        def to_meta(t: torch.Tensor) -> torch.Tensor:
            meta = torch.empty_like(t, device="meta")
            return nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta

        for module in self.root.modules():
            for table in (module._parameters, module._buffers):
                for attr, t in table.items():
                    if t is not None and not t.is_meta:
                        real, meta = swapped.setdefault(id(t), (t, to_meta(t)))
                        table[attr] = meta
                        holders.append((table, attr, real))
        try:
            yield
        finally:
            for table, attr, real in holders:
                table[attr] = real

    def load_outside_blocks(self) -> None:
        """Read for good everything outside the blocks (embeddings, final norm, head)."""
        inside = {id(p) for b in self.blocks for p in b.parameters()}
        for entry in [e for e in self.entries.values() if id(e.meta) not in inside]:
            self._install(entry)
            del self.entries[id(entry.meta)]

    @contextlib.contextmanager
    def streamed(self) -> Iterator[None]:
        """Inside, each block still on disk is read when it is called and dropped after it
        ran; everything outside the blocks (embeddings, final norm, head) is loaded for good."""
        if self._streaming:
            yield
            return
        blocks = self.blocks
        self.load_outside_blocks()
        handles = []
        for block in blocks:
            if self.pending(block):
                handles.append(block.register_forward_pre_hook(lambda m, _a: self._stream_in(m)))
                handles.append(block.register_forward_hook(lambda m, _a, _o: self._stream_out(m)))
        self._streaming = True
        try:
            yield
        finally:
            self._streaming = False
            for h in handles:
                h.remove()
            self._stream_out(self.root)

    def _stream_in(self, block: nn.Module) -> None:
        for entry in self.pending(block):
            if entry.live is None:
                entry.live = self._install(entry)
                self._live[id(entry.live)] = entry

    def _stream_out(self, module: nn.Module) -> None:
        """Streamed parameters go back to meta wherever they still sit (a pass that replaced
        their module meanwhile has dropped them already)."""
        for p in list(module.parameters()):
            entry = self._live.pop(id(p), None)
            if entry is None:
                continue
            for owner, attr in entry.owners:
                if owner._parameters.get(attr) is entry.live:
                    owner._parameters[attr] = entry.meta
            entry.live = None


def available_memory() -> int | None:
    """Bytes of memory available now (Linux ``MemAvailable``), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def return_freed_memory() -> None:
    """Hand memory that Python and torch freed back to the system (glibc keeps freed heap pages
    of a block-by-block run: 0.6 GB of a 1B-shaped int4 compile); a no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def held_on_disk(module: nn.Module, folder, min_bytes: int = 0) -> Iterator[None]:
    """Inside, ``module``'s tensors wait in a file under ``folder`` and their memory is free (each
    tensor object stays, empty); after, they are read back into the same objects. For a step
    that needs the memory but not the model (checking an exported file in ONNX Runtime).
    Modules whose tensors hold fewer than ``min_bytes`` stay as they are."""
    import gc
    from pathlib import Path

    tensors = list({id(t): t for t in (*module.parameters(), *module.buffers()) if not t.is_meta}.values())
    if sum(t.numel() * t.element_size() for t in tensors) < max(min_bytes, 1):
        yield
        return
    file = Path(folder) / "weights-held.pt"
    torch.save([t.detach() for t in tensors], file)
    for t in tensors:
        t.data = torch.empty(0, dtype=t.dtype, device=t.device)
    gc.collect()
    return_freed_memory()
    try:
        yield
    finally:
        for t, saved in zip(tensors, torch.load(file, weights_only=True), strict=True):
            t.data = saved.to(t.device)
        file.unlink()
