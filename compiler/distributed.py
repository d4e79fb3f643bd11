"""Calibration across processes with torch.distributed: shares, reductions, owners, failures.

Under an initialised process group (``torchrun``, or the caller's own), each rank runs the
block walk on its share of the calibration batches. What a solve needs is a sum over rows
(``X^T X``, per-channel sums, row counts), so the ranks add their sums with ``all_reduce``
and every rank then holds the statistics of all the data. The per-linear solves are divided
among the ranks (:func:`owner`) and each result is broadcast from its owner, so every rank
holds the same rewritten block and feeds its share through it. Without a process group every
function here is the single-process identity.

A rank that fails in a guarded region (:func:`guard`) tells the others at the region's end,
and every rank stops with the failing rank's error instead of waiting in the next collective.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

from presso.errors import PressoError


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """The rank that writes artifacts, checkpoints and progress bars."""
    return rank() == 0


def local_device() -> torch.device | None:
    """``cuda:LOCAL_RANK`` for a rank of a multi-GPU run, else None (the usual default)."""
    if active() and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank() % torch.cuda.device_count())))
    return None


def share(items: Sequence) -> list:
    """This rank's share of ``items`` (every ``world_size``-th, from ``rank``)."""
    if not active():
        return list(items)
    if len(items) < world_size():
        raise PressoError(f"{len(items)} calibration batches cannot be shared by {world_size()} processes",
                          hint="give at least one calibration batch per process, or run fewer processes")
    return list(items)[rank()::world_size()]


def owner(index: int) -> int:
    """The rank that solves the ``index``-th item of a list every rank walks in the same order."""
    return index % world_size()


def _wire(t: torch.Tensor) -> torch.Tensor:
    """Gloo reduces host tensors; NCCL device tensors."""
    if dist.get_backend() == "nccl":
        return t if t.is_cuda else t.to(local_device() or "cuda")
    return t if t.device.type == "cpu" else t.cpu()


def all_reduce_sum(tensors: Iterable[torch.Tensor]) -> None:
    """Each tensor replaced, in place, by its sum over ranks."""
    if not active():
        return
    for t in tensors:
        wire = _wire(t)
        dist.all_reduce(wire, op=dist.ReduceOp.SUM)
        if wire is not t:
            t.copy_(wire)


def barrier() -> None:
    if active():
        dist.barrier()


def reduce_min(n: int) -> int:
    """The smallest ``n`` over ranks (the block every rank has finished)."""
    if not active():
        return n
    t = _wire(torch.tensor([n], dtype=torch.float64))
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` in one process)."""
    if not active():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def file_suffix() -> str:
    """Part of the name of a file that each rank writes for itself ("" in one process)."""
    return f"-rank{rank()}-of{world_size()}" if active() else ""


@contextlib.contextmanager
def process_group() -> Iterator[None]:
    """A process group for the run when a launcher (``torchrun``) started several processes
    (``WORLD_SIZE`` > 1) and none exists yet: NCCL on GPUs, gloo on CPUs."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        yield
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def reduce_count(n: int) -> int:
    if not active():
        return n
    t = torch.tensor([n], dtype=torch.float64)
    all_reduce_sum([t])
    return int(t.item())


def broadcast_tensors(tensors: Sequence[torch.Tensor | None] | None, src: int,
                      device: torch.device) -> list[torch.Tensor | None]:
    """``src``'s tensors on every rank (on ``device``); other ranks pass None. Shapes and dtypes
    travel first as one small object, the data as tensors (no pickling of weights)."""
    if not active():
        return list(tensors)
    meta = [None if tensors is None else [None if t is None else (tuple(t.shape), t.dtype) for t in tensors]]
    dist.broadcast_object_list(meta, src=src)
    out = []
    for i, spec in enumerate(meta[0]):
        if spec is None:
            out.append(None)
            continue
        t = tensors[i].contiguous() if rank() == src else torch.empty(spec[0], dtype=spec[1], device=device)
        wire = _wire(t)
        dist.broadcast(wire, src=src)
        out.append(wire.to(device) if rank() != src else tensors[i])
    return out


class RankFailed(PressoError):
    """Another rank failed; this one stopped with its error."""


@contextlib.contextmanager
def guard(what: str) -> Iterator[None]:
    """Run the body; at its end every rank learns whether any rank failed in it, and all stop
    with the first failing rank's error (that rank re-raises its own)."""
    if not active():
        yield
        return
    error: BaseException | None = None
    try:
        yield
    except BaseException as exc:  # noqa: BLE001 - reported to the other ranks, then re-raised
        error = exc
    reports: list = [None] * world_size()
    dist.all_gather_object(reports, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(reports) if m is not None]
    if failed:
        r, message = failed[0]
        raise RankFailed(f"rank {r} of {world_size()} failed during {what}: {message}",
                         hint="fix the failing rank's error; with resume= the run restarts after the last "
                              "finished block")


def divided(items: Sequence, solve: Callable[[object], Sequence[torch.Tensor | None]],
            apply: Callable[[object, Sequence[torch.Tensor | None]], None], device: torch.device, what: str) -> None:
    """``apply(item, solve(item))`` for each item, where each ``solve`` runs on the item's owner
    only and its tensors reach every rank by broadcast. One process: solve and apply in turn,
    so that each result replaces its item before the next is solved (no results held at once)."""
    if not active():
        for item in items:
            apply(item, solve(item))
        return
    mine = {}
    with guard(what):
        for i, item in enumerate(items):
            if owner(i) == rank():
                mine[i] = solve(item)
    for i, item in enumerate(items):
        apply(item, broadcast_tensors(mine.pop(i, None), owner(i), device))
