"""Resumable block-by-block passes: each finished block is saved, so a run that stops (killed,
out of memory, power) starts again after the last finished block.

``compile(..., resume=FOLDER)`` keeps, per pass, one file per finished block (the rewritten
block, pickled whole) and the calibration inputs of the next block. Each file is written
beside its final name and renamed into place, so a file that exists is complete; a block
whose file is missing is redone. A pass's folder is named by what makes its work the same
(its position, name and options, the model and the calibration data); anything else
starts that pass afresh.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from presso import distributed
from presso.errors import ExportError


class PassProgress:
    """The saved blocks of one pass run: ``block-K.pt`` (block K as the pass left it) and
    ``inputs-K.pt`` (the calibration inputs of block K, that is block K-1's outputs).

    Across processes, rank 0 writes the blocks (every rank holds the same) and each rank the
    inputs of its own calibration share (``inputs-K-rankR-ofW.pt``); a run resumes after the
    last block that every rank finished."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def finished(self) -> int:
        """The last block of an unbroken run from block 0 whose successor's inputs are saved
        too (-1: none): a run stopped between the two files redoes that block."""
        last = -1
        while (self.folder / _block_file(last + 1)).is_file():
            last += 1
        while last >= 0 and not (self.folder / _inputs_file(last + 1)).is_file():
            last -= 1
        return distributed.reduce_min(last)

    def load(self, index: int, device: torch.device) -> nn.Module:
        return torch.load(self.folder / _block_file(index), map_location="cpu", weights_only=False).to(device)

    def load_calls(self, device: torch.device) -> list:
        """The inputs of the first block not finished."""
        return torch.load(self.folder / _inputs_file(self.finished() + 1), map_location=device, weights_only=False)

    def save(self, index: int, block: nn.Module, next_calls: list) -> None:
        """Block ``index``, then the inputs of the next block; the inputs of block ``index`` go
        last (once every rank wrote its next ones), so a stop anywhere leaves a consistent
        earlier state."""
        if distributed.is_main():
            atomic_save(block, self.folder / _block_file(index))
        atomic_save(next_calls, self.folder / _inputs_file(index + 1))
        distributed.barrier()
        (self.folder / _inputs_file(index)).unlink(missing_ok=True)


class Progress:
    """The resume folder of one compile: a sub-folder per pass run."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ExportError(f"cannot use {self.folder} to save progress: {exc}",
                              hint="give resume= a writable folder") from exc
        self.current: PassProgress | None = None

    def begin(self, index: int, name: str, config: dict[str, Any], model: nn.Module, calibration) -> None:
        key = _fingerprint(index, name, config, model, calibration)
        for stale in self.folder.glob(f"{index:02d}-*") if distributed.is_main() else ():
            if stale.name != f"{index:02d}-{name}-{key}":
                shutil.rmtree(stale)  # the same position, other work: not to be resumed
        distributed.barrier()
        self.current = PassProgress(self.folder / f"{index:02d}-{name}-{key}")

    def end(self) -> None:
        self.current = None


def _block_file(index: int) -> str:
    return f"block-{index:04d}.pt"


def _inputs_file(index: int) -> str:
    return f"inputs-{index:04d}{distributed.file_suffix()}.pt"


def atomic_save(obj: Any, target: Path) -> None:
    """``torch.save`` beside ``target``, then renamed into place: a file that exists is whole."""
    partial = target.with_name(target.name + ".partial")
    try:
        torch.save(obj, partial)
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _fingerprint(index: int, name: str, config: dict, model: nn.Module, calibration) -> str:
    h = hashlib.sha256(json.dumps([index, name, config], sort_keys=True, default=str).encode())
    h.update(type(model).__name__.encode())
    for n, p in model.named_parameters():
        h.update(f"{n}{tuple(p.shape)}{p.dtype}".encode())
    for item in calibration or []:
        for t in item.tensors:
            h.update(f"{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.detach().cpu().contiguous().view(-1)[:4096].numpy().tobytes())
    return h.hexdigest()[:12]
