"""``CompiledModel.export``: ONNX file (+ external data) and ``manifest.json``, written atomically."""
from __future__ import annotations

import os
from pathlib import Path

from presso.plugins.registry import get_registry
from presso.runtime.artifact import MANIFEST, model_path, staged, write_json
from presso.runtime.onnx_export import write_onnx


def export_artifact(compiled, path: str | os.PathLike) -> Path:
    """Returns the path of the written ONNX file."""
    target = model_path(path)
    with staged(target.parent) as stage:
        write_onnx(compiled.graph, stage / target.name, get_registry().onnx_lowerings)
        size = sum(f.stat().st_size for f in stage.iterdir())
        manifest = dict(compiled.manifest, model_file=target.name, bytes_on_disk=size)
        write_json(stage / MANIFEST, manifest)
    compiled.report["bytes_on_disk"] = size
    return target
