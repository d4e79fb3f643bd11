"""Backends: ONNX export, ONNX Runtime sessions, and the torch reference ops."""
from presso.runtime.ort_model import OrtModel, load

__all__ = ["OrtModel", "load"]
