"""ONNX Runtime-backed models: called like the original, on CPU or CUDA."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from presso.errors import ExportError
from presso.runtime.artifact import model_path, read_manifest
from presso.signature import CallSpec


def default_providers() -> list[str]:
    available = ort.get_available_providers()
    wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return [p for p in wanted if p in available] or available


class OrtModel:
    """An ``onnxruntime.InferenceSession`` with the call signature of the traced model."""

    def __init__(self, path: str | os.PathLike, spec: CallSpec, providers: list[str] | None = None,
                 manifest: dict[str, Any] | None = None):
        self.path = Path(path)
        self.spec = spec
        self.manifest = manifest or {}
        self.session = session(self.path, providers)
        self._input_names = [i.name for i in self.session.get_inputs()]

    def run_flat(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feed = {name: _numpy(t) for name, t in zip(self.spec.input_names, tensors) if name in self._input_names}
        return tuple(torch.from_numpy(np.asarray(o)) for o in self.session.run(None, feed))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.spec.unflatten_outputs(list(self.run_flat(*self.spec.flatten_inputs(args, kwargs))))


def session(path: Path, providers: list[str] | None = None, threads: int | None = None,
            lean: bool = False) -> ort.InferenceSession:
    """An InferenceSession, or an ExportError that says the file is unusable. ``lean``: for a
    one-off check, no second copy of the weights in kernel layouts and no memory arena."""
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if lean:
        options.add_session_config_entry("session.disable_prepacking", "1")
        options.enable_cpu_mem_arena = False
    try:
        return ort.InferenceSession(str(path), options, providers=providers or default_providers())
    except Exception as exc:  # noqa: BLE001 - corrupt or foreign files
        raise ExportError(f"ONNX Runtime cannot load {path}: {str(exc).strip()[:300]}",
                          hint="export the model again; the file may be truncated or corrupt") from exc


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


def load(path: str | os.PathLike, providers: list[str] | None = None, threads: int | None = None) -> Any:
    """Load an exported model (``DIR`` or ``DIR/model.onnx``) into ONNX Runtime.

    Causal LMs exported with a KV cache come back as :class:`~presso.runtime.decoder.OrtDecoder`
    (``model(ids).logits`` and ``generate``); other models as :class:`OrtModel`.
    """
    from presso.runtime.decoder import CacheLayout, OrtDecoder

    file = model_path(path)
    if not file.exists():
        raise ExportError(f"no ONNX model at {file}", hint="pass the folder or .onnx file that export() wrote")
    manifest = read_manifest(file)
    if manifest and manifest.get("decoder"):
        return OrtDecoder(session(file, providers, threads), CacheLayout(**manifest["decoder"]), manifest, file)
    spec = CallSpec(**manifest["call_spec"]) if manifest else _spec_from_onnx(file)
    return OrtModel(file, spec, providers, manifest)


def _spec_from_onnx(file: Path) -> CallSpec:
    """Without a manifest: inputs positional in graph order, outputs as a tuple."""
    try:
        graph = onnx.load(str(file), load_external_data=False).graph
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"{file} is not a readable ONNX model: {exc}", hint="export the model again") from exc
    names = [i.name for i in graph.input]
    return CallSpec(input_names=names, n_args=len(names), hf=False, output_kind="tuple")
