"""``CompiledModel``: the result of :func:`presso.compile`."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from presso.graph import Graph
from presso.report import Report


class CompiledModel:
    """Callable like the original model; ``.module`` is the rewritten ``nn.Module``.

    ``export(path)`` writes an ONNX file plus ``manifest.json`` beside it; ``report`` says
    what the passes cost and saved.
    """

    def __init__(self, graph: Graph, run: Callable, report: Report, backend: str, manifest: dict[str, Any]):
        self.graph = graph
        self._run = run
        self.report = report
        self.backend = backend
        self.manifest = manifest

    @property
    def module(self):
        return self.graph.module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        spec = self.graph.spec
        return spec.unflatten_outputs(list(self._run(*spec.flatten_inputs(args, kwargs))))

    def export(self, path: str | os.PathLike, *, tokenizer: Any = None, kv_cache: bool = True,
               fuse: bool = True) -> Path:
        """Write ``path`` (a ``.onnx`` file, or a folder that gets ``model.onnx``) atomically.

        Beside it: ``manifest.json``, ``report.md`` and, if given, the tokenizer's files.
        Causal LMs get KV-cache inputs/outputs unless ``kv_cache=False``, and ONNX Runtime's fused
        decoder operators where they cover the model unless ``fuse=False`` (the manifest's
        ``fusions`` says which applied, or why none did).
        """
        from presso.runtime.export import export_artifact

        return export_artifact(self, path, tokenizer=tokenizer, kv_cache=kv_cache, fuse=fuse)

    def __repr__(self) -> str:
        r = self.report
        return (f"CompiledModel({r.get('model')}, backend={self.backend!r}, passes="
                f"{[p['name'] for p in r.get('passes', [])]}, bytes {r['bytes_before']:,} -> {r['bytes_after']:,})")
