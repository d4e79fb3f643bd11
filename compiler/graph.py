"""Tracing with ``torch.export`` and the ``Graph`` that passes read and rewrite.

``Graph`` holds the working copy of the model (``module``) and its traced FX graph
(``exported``), re-traced lazily after a pass changes the module. Every call node carries
``node.meta["presso"]``: the module path that issued it, that module's type, the output
shape and dtype, and the parameters it reads.
"""
from __future__ import annotations

import contextlib
import linecache
import logging
import os
import re
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from presso.errors import TraceError
from presso.lazy import LazyWeights
from presso.progress import Progress
from presso.signature import CallSpec, Inputs, Traceable

_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIR = os.path.dirname(os.path.abspath(__file__))
_WRAPPER_PREFIX = "model."


@dataclass(frozen=True)
class NodeInfo:
    module_path: str
    module_type: str
    shape: tuple[int, ...] | None
    dtype: torch.dtype | None
    params: tuple[str, ...]


class Graph:
    """A model under compilation: the eager working copy plus its traced graph."""

    def __init__(self, module: nn.Module, spec: CallSpec, example_inputs: Inputs, dynamic: bool = True):
        self.module = module
        self.spec = spec
        self.example_inputs = example_inputs
        self.dynamic = dynamic
        self.weights: LazyWeights | None = None  # parameters still to read (presso.lazy), if any
        self.device = torch.device("cpu")  # where calibration runs, block by block (compile's device=)
        self.progress: Progress | None = None  # finished blocks saved for a resume (compile's resume=)
        self._exported: torch.export.ExportedProgram | None = None

    # --- the traced view -------------------------------------------------
    @property
    def exported(self) -> torch.export.ExportedProgram:
        if self._exported is None:
            partly_loaded = self.weights is not None and bool(self.weights.pending())
            inputs = _on_meta(self.example_inputs) if partly_loaded else self.example_inputs
            with self.weights.all_meta() if partly_loaded else contextlib.nullcontext():
                self._exported, self.dynamic = export_program(self.traceable(), inputs, self.dynamic)
            self._traced_on_meta = partly_loaded  # its constants are placeholders: analysis only
            annotate(self._exported)
        return self._exported

    def invalidate(self) -> None:
        """Call after changing ``module``: the next read of ``exported`` traces again."""
        self._exported = None

    def nodes(self, *targets: Any) -> Iterator[tuple[torch.fx.Node, NodeInfo]]:
        """Call nodes (optionally only those whose target is in ``targets``) with their info."""
        for node in self.exported.graph.nodes:
            if node.op == "call_function" and (not targets or node.target in targets):
                yield node, node.meta["presso"]

    def called_modules(self) -> dict[str, nn.Module]:
        """Submodules that issue ops in the trace, by path, in call order; a module reached by
        several paths (a shared factor) is listed once, at the first."""
        seen: dict[str, nn.Module] = {}
        for _, info in self.nodes():
            if info.module_path and info.module_path not in seen:
                module = self.module.get_submodule(info.module_path)
                if not any(m is module for m in seen.values()):
                    seen[info.module_path] = module
        return seen

    # --- the eager view --------------------------------------------------
    def traceable(self) -> Traceable:
        return Traceable(self.module, self.spec)

    def forward(self, inputs: Inputs | None = None, module: nn.Module | None = None) -> tuple[torch.Tensor, ...]:
        """Flat outputs of ``module`` (default: the working copy) on ``inputs``, gradients allowed.
        Another module with the same call signature (the original, kept for a refit) runs too."""
        inputs = inputs or self.example_inputs
        model = self.traceable() if module is None else Traceable(module, self.spec)
        streamed = self.weights.streamed() if self.weights is not None and module is None else contextlib.nullcontext()
        with streamed:
            return model(*self.spec.flatten_inputs(inputs.args, inputs.kwargs))

    def release(self, old: nn.Module) -> None:
        """Free the weights of ``old``, a module a pass has replaced, that the model no longer
        holds: a pass that keeps the replaced modules in a dict would otherwise keep every float
        weight it read until it ends."""
        alive = {id(p) for p in self.module.parameters()}
        for m in old.modules():
            for attr, p in m._parameters.items():
                if p is not None and not p.is_meta and id(p) not in alive:
                    m._parameters[attr] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)

    def materialize(self, module: nn.Module | None = None, why: str = "") -> None:
        """Read ``module``'s weights still on disk (all of them when ``module`` is None: refused with
        the way out when they would not fit in memory). A no-op for a model held whole."""
        if self.weights is None:
            return
        if module is None:
            self.weights.load_all(why or "this step")
        else:
            self.weights.load(module)
        if getattr(self, "_traced_on_meta", False) and not self.weights.pending():
            self.invalidate()  # the next trace holds the real weights

    @torch.no_grad()
    def run(self, inputs: Inputs | None = None, module: nn.Module | None = None) -> tuple[torch.Tensor, ...]:
        """:meth:`forward` without gradients."""
        return self.forward(inputs, module)


def _on_meta(inputs: Inputs) -> Inputs:
    meta = lambda t: torch.empty_like(t, device="meta")  # noqa: E731
    return Inputs(tuple(map(meta, inputs.args)), {k: meta(v) for k, v in inputs.kwargs.items()})


def export_program(traceable: nn.Module, inputs: Inputs, dynamic: bool) -> tuple[Any, bool]:
    """``torch.export`` with every input dimension dynamic where possible, else static.

    torch.export fixes dimensions of size 1, so a batch of one is traced as a batch of two
    (the example repeated) to keep the batch dimension dynamic.
    """
    tensors = inputs.tensors
    with _quiet_export_logs():
        if dynamic:
            auto = torch.export.Dim.AUTO
            for candidate in (_batch_of_two(tensors), tensors):
                try:
                    shapes = tuple({i: auto for i in range(t.dim())} for t in candidate)
                    return torch.export.export(traceable, candidate, dynamic_shapes=(shapes,), strict=False), True
                except Exception:  # noqa: BLE001 - some models only trace with static shapes
                    continue
        try:
            return torch.export.export(traceable, tensors, strict=False), False
        except Exception as exc:  # noqa: BLE001 - re-raised with a readable message
            raise trace_error(traceable.model, exc) from exc


def _batch_of_two(tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.cat([t, t]) if t.dim() and t.shape[0] == 1 else t for t in tensors)


@contextlib.contextmanager
def _quiet_export_logs():
    # torch.export logs each specialised dimension at WARNING; the user cannot act on them
    loggers = [logging.getLogger(n) for n in ("torch._export", "torch.export", "torch.fx.experimental.symbolic_shapes")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def annotate(ep: torch.export.ExportedProgram) -> None:
    """Attach a :class:`NodeInfo` to every call node."""
    param_of = dict(ep.graph_signature.inputs_to_parameters)
    param_of.update(ep.graph_signature.inputs_to_buffers)
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        stack = {k: v for k, v in (node.meta.get("nn_module_stack") or {}).items() if not k.startswith("_empty")}
        path, mtype = "", ""
        if stack:
            path, cls = list(stack.values())[-1]
            path = _clean_path(path)
            mtype = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
            mtype = mtype.rsplit(".", 1)[-1]
        val = node.meta.get("val")
        shape = tuple(val.shape) if isinstance(val, torch.Tensor) else None
        dtype = val.dtype if isinstance(val, torch.Tensor) else None
        params = tuple(_strip(param_of[a.name]) for a in node.all_input_nodes if a.name in param_of)
        node.meta["presso"] = NodeInfo(path, mtype, shape, dtype, params)


def _clean_path(path: str) -> str:
    # nn_module_stack paths look like "L['self'].model.layers[0]" or "model.layers.0"
    path = path.replace("L['self'].", "").replace("L['self']", "")
    path = path.replace("[", ".").replace("]", "").replace("'", "")
    if path.startswith("_modules."):
        path = path.replace("_modules.", "")
    return _strip(_SLICE.sub(_sliced_index, path))


# torch.export names modules by their source path when one module is reached by two (a
# shared factor): a module list sliced in forward (HF's ``layers[:n]``) then reads
# "layers.slice(None, 2, None).0"
_SLICE = re.compile(r"\.slice\((None|\d+), (None|-?\d+), (None|\d+)\)\.(\d+)")


def _sliced_index(match: re.Match) -> str:
    start = int(match[1]) if match[1] != "None" else 0
    step = int(match[3]) if match[3] != "None" else 1
    return f".{start + int(match[4]) * step}"


def _strip(name: str) -> str:
    return name[len(_WRAPPER_PREFIX):] if name.startswith(_WRAPPER_PREFIX) else ("" if name == "model" else name)


def trace_error(model: nn.Module, exc: BaseException) -> TraceError:
    """Name the model class, the failing line (outside torch) and what to try."""
    where = user_frame(exc)
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    msg = f"could not trace {type(model).__name__} with torch.export: {type(exc).__name__}: {first}"
    if where:
        msg += f"\n  at {where}"
    hint = ("make control flow independent of tensor values (or use torch.cond), avoid .item()/.tolist() "
            "and Python side effects in forward, or wrap the model in a module whose forward is traceable")
    return TraceError(msg, hint=hint)


def user_frame(exc: BaseException) -> str:
    frames = []
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        frames = traceback.extract_tb(exc.__traceback__) + frames
        exc = exc.__cause__ or exc.__context__
    for fr in reversed(frames):
        if not fr.filename.startswith((_TORCH_DIR, _OWN_DIR)):
            line = (fr.line or linecache.getline(fr.filename, fr.lineno)).strip()
            return f"{fr.filename}:{fr.lineno} in {fr.name}: {line}"
    return ""


def replace_module(root: nn.Module, path: str, new: nn.Module) -> list[str]:
    """Put ``new`` at ``path`` and at every other path that holds the same module object.

    A module reached by several paths (a first factor shared by gate and up) stays shared
    when a pass replaces it, instead of being split into a new and a stale copy.
    """
    old = root.get_submodule(path)
    paths = [p for p, m in root.named_modules(remove_duplicate=False) if m is old and p]
    for p in paths:
        root.set_submodule(p, new)
    return paths
