"""Atomic artifact writing: build in a temporary folder beside the target, then move in.

A failure at any step leaves the target as it was: no half-written model or manifest.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from presso.errors import ExportError

MANIFEST = "manifest.json"


def model_path(path: str | os.PathLike) -> Path:
    """``DIR`` means ``DIR/model.onnx``; a path ending in ``.onnx`` is the model file itself."""
    path = Path(path)
    return path if path.suffix == ".onnx" else path / "model.onnx"


@contextmanager
def staged(target_dir: Path) -> Iterator[Path]:
    """Yield a staging folder; on success its files replace those in ``target_dir``, manifest last.
    On failure nothing changes: a ``target_dir`` made here is removed again."""
    made = _missing_parents(target_dir)
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".presso-stage-", dir=target_dir))
    except OSError as exc:
        raise ExportError(f"cannot write to {target_dir}: {exc.strerror or exc}",
                          hint="choose a writable directory for the export") from exc
    try:
        yield stage
        files = sorted(stage.iterdir(), key=lambda p: (p.name == MANIFEST, p.suffix == ".onnx"))
        for f in files:
            os.replace(f, target_dir / f.name)
    except OSError as exc:
        _remove_empty(made)
        raise ExportError(f"writing the artifact to {target_dir} failed: {exc}",
                          hint="check free disk space and permissions") from exc
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        _remove_empty(made)
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _missing_parents(folder: Path) -> list[Path]:
    """``folder`` and its parents that do not exist yet, deepest first."""
    missing = []
    for p in (folder, *folder.parents):
        if p.exists():
            break
        missing.append(p)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for p in folders:
        try:
            p.rmdir()
        except OSError:
            break


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def read_manifest(model_file: Path) -> dict[str, Any] | None:
    path = model_file.parent / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path} is not a readable manifest: {exc}",
                          hint="export the model again with CompiledModel.export()") from exc
