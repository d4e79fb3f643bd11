"""Calibration inputs of a block, held in memory or, past a budget, on disk.

A block's calibration inputs are its hidden states for every calibration sequence: 128 x 2048
tokens of a 8,192-wide model are 4.3 GB in bf16, and the walk holds a block's inputs and
outputs at once. Past ``budget`` bytes the calls go to files in a folder (the resume folder, or
a temporary one) and are read back one at a time, onto the compute device, as the block runs.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from presso.errors import PressoError
from presso.lazy import available_memory
from presso.progress import atomic_save

BUDGET_FRACTION = 0.25  # of the memory free when the walk starts, unless PRESSO_ACTIVATION_BUDGET says


def activation_budget(device: torch.device) -> int:
    """Bytes of calibration inputs a block may keep in memory (``PRESSO_ACTIVATION_BUDGET``
    in bytes, or a suffix: ``8GB``; default a quarter of the memory free on the device)."""
    text = os.environ.get("PRESSO_ACTIVATION_BUDGET")
    if text:
        units = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}
        unit = next((u for u in units if text.upper().endswith(u)), None)
        try:
            return int(float(text[: -len(unit)] if unit else text) * (units[unit] if unit else 1))
        except ValueError as exc:
            raise PressoError(f"PRESSO_ACTIVATION_BUDGET={text!r} is not a size",
                              hint="give bytes or a size such as 8GB") from exc
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = available_memory() or 1 << 62
    return int(BUDGET_FRACTION * free)


def call_size(call) -> int:
    return sum(t.numel() * t.element_size() for t in (*call.args, *call.kwargs.values())
               if isinstance(t, torch.Tensor))


class CallStore(Sequence):
    """Calls appended one at a time: kept in memory up to ``budget`` bytes, then every call on
    disk under ``folder`` (a file per call, written beside its name and renamed into place)."""

    def __init__(self, folder: Path | None, budget: int, device: torch.device, expected: int = 0):
        self.folder, self.budget, self.device, self.expected = folder, budget, device, expected
        self.memory: list = []
        self.files: list[Path] = []
        self.nbytes = 0

    @property
    def on_disk(self) -> bool:
        return bool(self.files)

    def append(self, call) -> None:
        size = call_size(call)
        self.nbytes += size
        if not self.files and (self.folder is None or self.nbytes <= self.budget):
            self.memory.append(call)
            return
        if not self.files:  # the budget is passed: what is held goes to disk first
            self._check_disk(size * max(self.expected, len(self.memory) + 1) * 2)  # two generations
            for held in self.memory:
                self._write(held)
            self.memory.clear()
        self._write(call)

    def __len__(self) -> int:
        return len(self.files) or len(self.memory)

    def __getitem__(self, index: int):
        if not self.files:
            return self.memory[index]
        return torch.load(self.files[index], map_location=self.device, weights_only=False)

    def __iter__(self) -> Iterator:
        for i in range(len(self)):
            yield self[i]

    def _write(self, call) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.folder / f"call-{len(self.files):05d}.pt"
        try:
            atomic_save(call.to(torch.device("cpu")), target)
        except OSError as exc:
            raise self._no_room(exc) from exc
        self.files.append(target)

    def _check_disk(self, need: int) -> None:
        existing = next(p for p in (self.folder, *self.folder.parents) if p.exists())
        free = shutil.disk_usage(existing).free
        if free < need:
            raise self._no_room(None, need, free)

    def _no_room(self, exc: OSError | None, need: int | None = None, free: int | None = None) -> PressoError:
        what = f"{_size(need)} needed, {_size(free)} free" if need else str(exc)
        return PressoError(f"cannot keep the calibration inputs of a block on disk under {self.folder} ({what})",
                           hint="give resume= a folder on a disk with room, raise PRESSO_ACTIVATION_BUDGET, "
                                "or calibrate on fewer sequences")


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"
