"""The public entry points: ``compile``, ``make_pass``, ``list_passes``, ``list_importances``."""
from __future__ import annotations

import inspect
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from presso import distributed
from presso.compiled import CompiledModel
from presso.errors import ConfigError, ExportError, PressoError, TraceError
from presso.graph import Graph, user_frame
from presso.lazy import LazyWeights, lazy_copy, return_freed_memory
from presso.manager import PassManager
from presso.numerics import (
    FLOOR_FACTOR,
    allowed_error,
    float_dtype,
    max_abs_error,
    noise_floor,
    rel_error,
    rounding_noise,
)
from presso.pass_api import Context, Pass
from presso.plugins.registry import get_registry
from presso.progress import Progress
from presso.report import Report, count_bytes, count_params
from presso.signature import Inputs, hf_call_options, make_call_spec, normalize_inputs

# lowerings reproduce the reference arithmetic, so float32 rounding stays far below this; a model
# with quantized activations may drift further, by up to FLOOR_FACTOR times its own noise floor
BACKEND_TOLERANCE = 1e-2


def list_passes() -> list[str]:
    """Names of every registered pass, built-in and from plugins, sorted."""
    return sorted(get_registry().passes)


def list_importances() -> list[str]:
    """Names of every registered pruning importance (``prune_structured(importance=...)``), sorted."""
    return sorted(get_registry().importances)


def make_pass(name: str, **options: Any) -> Pass:
    """Build the registered pass ``name`` with ``options`` (checked against its config)."""
    passes = get_registry().passes
    if name not in passes:
        raise ConfigError(f"unknown pass {name!r}", hint=f"available passes: {', '.join(sorted(passes)) or 'none'}")
    return passes[name](**options)


def resolve_passes(passes: Iterable[Pass | str]) -> list[Pass]:
    if isinstance(passes, (str, Pass)):
        passes = [passes]
    resolved = []
    for p in passes:
        if isinstance(p, str):
            resolved.append(make_pass(p))
        elif isinstance(p, Pass):
            resolved.append(p)
        else:
            raise ConfigError(f"passes must hold Pass objects or pass names, got {type(p).__name__}",
                              hint="use presso.make_pass(name, **options) or a name from presso.list_passes()")
    return resolved


def compile(model: nn.Module | str | os.PathLike, passes: Sequence[Pass | str] = (), *, example_inputs: Any,
            calibration: Iterable[Any] | None = None, backend: str = "torch",
            verify: bool = True, recipe: str | None = None, device: str | None = None,
            resume: str | os.PathLike | None = None) -> CompiledModel:
    """Trace ``model``, run ``passes`` on a copy, lower to ``backend``; ``model`` is never changed.

    ``device`` is where calibration runs, one block at a time (default: CUDA when there is one);
    the compiled model stays where the model was. ``resume`` is a folder where block-by-block
    passes save each finished block: a run that stopped, given the same folder, starts after
    the last finished block (:mod:`presso.progress`).

    ``model`` is a module or a Hugging Face folder of safetensors files; either way the
    working copy reads its weights one block at a time, as the passes reach them
    (:mod:`presso.lazy`). ``recipe`` names a shipped pipeline
    (``presso.recipes.list_recipes()``); its passes run first, then ``passes``.
    """
    start = time.perf_counter()
    pass_list = _recipe_passes(recipe) + resolve_passes(passes)
    lower = _backend(backend)
    inputs = normalize_inputs(example_inputs)
    calib = None if calibration is None else [normalize_inputs(c, "each calibration item") for c in calibration]
    work, weights = _working_copy(model)
    graph = _trace(work, weights, inputs)
    graph.device = _device(device)
    graph.progress = Progress(resume) if resume is not None else None
    before = (count_params(graph.module), count_bytes(graph.module))
    ctx = Context(inputs, calib, facts={"calibration"} if calib else set())
    manager = PassManager(pass_list, verify=verify)
    graph = manager.run(graph, ctx)
    return_freed_memory()  # the float blocks read and dropped along the way
    graph.materialize(why=f"lowering to {backend!r}")  # what no pass read yet (an uncompressed model)
    run = lower(graph)
    report = _report(model, graph, manager, backend, before, run, start)
    if verify and report.get("backend_rel_error", 0.0) > report.get("backend_allowed", BACKEND_TOLERANCE):
        raise ExportError(f"the {backend} backend disagrees with the torch reference: relative error "
                          f"{report['backend_rel_error']:.3g} on the example inputs (allowed "
                          f"{report['backend_allowed']:.3g}: {BACKEND_TOLERANCE:g}, or {FLOOR_FACTOR:g}x the "
                          f"model's own noise floor {report['backend_noise_floor']:.3g})",
                          hint="a lowering is wrong for this model: use backend='torch' and report the model")
    return CompiledModel(graph, run, report, backend, _manifest(graph, manager, report))


def _recipe_passes(recipe: str | None) -> list[Pass]:
    if recipe is None:
        return []
    from presso.recipes import load_recipe

    return load_recipe(recipe).make_passes()


def _backend(name: str):
    backends = get_registry().backends
    if name not in backends:
        raise ConfigError(f"unknown backend {name!r}", hint=f"available backends: {', '.join(sorted(backends))}")
    return backends[name]


def _device(name: str | None) -> torch.device:
    if name is None:  # a rank of a several-GPU run takes its own GPU
        return distributed.local_device() or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {name!r}", hint="use 'cpu', 'cuda' or 'cuda:N'") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but this machine has no CUDA device",
                          hint="leave device= out (CPU here) or run on a machine with a GPU")
    return device


def _working_copy(model: nn.Module | str | os.PathLike) -> tuple[nn.Module, LazyWeights]:
    """The copy the passes rewrite, its parameters still to read (from ``model`` or from disk)."""
    if isinstance(model, (str, os.PathLike)):
        from presso.checkpoint import open_checkpoint

        return open_checkpoint(model)
    if not isinstance(model, nn.Module):
        raise PressoError(f"model must be a torch.nn.Module or a Hugging Face folder, got {type(model).__name__}")
    try:
        work, weights = lazy_copy(model)
    except Exception as exc:  # noqa: BLE001
        raise TraceError(f"could not copy {type(model).__name__} ({type(exc).__name__}: {exc}); presso works "
                         "on a copy so that your model is never changed",
                         hint="make the model deep-copyable (no open files or locks as attributes)") from exc
    return work.eval(), weights


def _trace(work: nn.Module, weights: LazyWeights, inputs: Inputs) -> Graph:
    with weights.streamed():
        outputs = _run_eager(work, inputs)
    graph = Graph(work, make_call_spec(work, inputs, outputs), inputs)
    graph.weights = weights
    _ = graph.exported  # trace now, so a model that will not trace fails before any pass runs
    return graph


@torch.no_grad()
def _run_eager(model: nn.Module, inputs: Inputs) -> Any:
    try:
        return model(*inputs.args, **inputs.kwargs, **hf_call_options(model))
    except Exception as exc:  # noqa: BLE001
        sig = inspect.signature(model.forward)
        where = user_frame(exc)
        raise TraceError(
            f"{type(model).__name__}{sig} failed on the example inputs "
            f"({', '.join(f'{tuple(t.shape)} {t.dtype}' for t in inputs.tensors)}): "
            f"{type(exc).__name__}: {str(exc).strip()[:300]}" + (f"\n  at {where}" if where else ""),
            hint="example_inputs must be what model(...) takes: a tensor, a tuple in forward's order, or a dict",
        ) from exc


def _report(model, graph: Graph, manager: PassManager, backend: str, before, run, start) -> Report:
    final, original = graph.run(), manager.original_outputs
    report = Report(model=type(graph.module).__name__, backend=backend,
                    params_before=before[0], params_after=count_params(graph.module),
                    bytes_before=before[1], bytes_after=count_bytes(graph.module),
                    passes=[r.to_dict() for r in manager.records],
                    rel_error=rel_error(final, original), max_abs_error=max_abs_error(final, original))
    if backend != "torch":
        report["backend_rel_error"] = rel_error(run(*graph.example_inputs.tensors), final)
        report["backend_noise_floor"] = 0.0
        if report["backend_rel_error"] > BACKEND_TOLERANCE:  # only then is the noise floor worth a run
            noise = rounding_noise(float_dtype(graph.module))  # a half-precision model rounds far more
            report["backend_noise_floor"] = noise_floor(graph.called_modules().values(),
                                                        lambda: rel_error(graph.run(), final), noise)
        report["backend_allowed"] = allowed_error(BACKEND_TOLERANCE, report["backend_noise_floor"])
    report["seconds"] = time.perf_counter() - start
    return report


def _manifest(graph: Graph, manager: PassManager, report: Report) -> dict[str, Any]:
    registry = get_registry()
    return {
        "format": "presso-onnx/1",
        "model": report["model"],
        "call_spec": graph.spec.to_dict(),
        "passes": [{"name": p.name, "config": p.config.to_dict(),
                    "plugin": registry.sources.get(("pass", p.name), "local")} for p in manager.passes],
        "plugins": dict(registry.plugins),
        "versions": {"torch": torch.__version__, **_versions("onnx", "onnxruntime", "transformers")},
        "report": {k: v for k, v in report.items() if k != "bytes_on_disk"},
    }


def _versions(*names: str) -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for n in names:
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            out[n] = "missing"
    return out
