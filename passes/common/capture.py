"""Seeing what modules read and write during a forward pass, with hooks that are always removed.

Every calibrated pass observes modules the same way: ``with inputs_of(modules, record):``
runs ``record(path, x)`` on each module's first positional input while the block is open,
and removes its hooks on the way out, whatever happened inside.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

Record = Callable[[str, torch.Tensor], None]


@contextlib.contextmanager
def _hooked(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def inputs_of(modules: Mapping[str, nn.Module], record: Record) -> contextlib.AbstractContextManager:
    """``record(path, x)`` with the first positional input of each module, before it runs."""
    return _hooked([m.register_forward_pre_hook(lambda _m, args, p=p: record(p, args[0]))
                    for p, m in modules.items()])


def calls_and_outputs_of(modules: Mapping[str, nn.Module], record: Callable[[str, tuple, object], None]
                         ) -> contextlib.AbstractContextManager:
    """``record(path, args, output)`` after each module runs."""
    return _hooked([m.register_forward_hook(lambda _m, args, out, p=p: record(p, args, out))
                    for p, m in modules.items()])


def output_grads_of(modules: Mapping[str, nn.Module], record: Record) -> contextlib.AbstractContextManager:
    """``record(path, g)`` with d loss / d output of each module, during ``backward()``.

    A hook on the output tensor, not a full backward hook: the latter wraps the output in a view
    that a model editing its output in place (Falcon's attention) may not modify."""
    def watch(path: str):
        def hook(_module, _args, out):
            if isinstance(out, torch.Tensor) and out.requires_grad:
                out.register_hook(lambda g: record(path, g))
        return hook

    return _hooked([m.register_forward_hook(watch(p)) for p, m in modules.items()])


def before_calls(modules, hook: Callable[[nn.Module, tuple], None]) -> contextlib.AbstractContextManager:
    """``hook(module, args)`` before each call of each of ``modules``; it may raise to end the run."""
    return _hooked([m.register_forward_pre_hook(hook) for m in modules])


def calls_of(module: nn.Module, record: Callable[[tuple, dict], None]) -> contextlib.AbstractContextManager:
    """``record(args, kwargs)`` with every call of ``module``, before it runs."""
    return _hooked([module.register_forward_pre_hook(lambda _m, args, kwargs: record(args, kwargs),
                                                     with_kwargs=True)])


def rows(x: torch.Tensor, channels_first: bool = False) -> torch.Tensor:
    """``x`` as a (rows, channels) float32 matrix; ``channels_first`` for a convolution's NCHW input."""
    x = x.detach()
    if channels_first:
        x = x.movedim(1, -1)
    return x.reshape(-1, x.shape[-1]).float()
