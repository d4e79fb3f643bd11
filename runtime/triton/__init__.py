"""Triton GPU kernels for quantized linears (``backend="triton"``). Importing a submodule needs triton."""
from __future__ import annotations

import importlib.util

import torch

from presso.errors import ConfigError


def check_available() -> None:
    """Raise a clear error where the Triton backend cannot run (no CUDA GPU, or no triton)."""
    if not torch.cuda.is_available():
        raise ConfigError("backend='triton' needs a CUDA GPU, and torch sees none"
                          + ("" if torch.version.cuda else f" (torch {torch.__version__} is a CPU-only build)"),
                          hint="on CPU use backend='onnxruntime' or 'torch'; on a GPU machine install a CUDA "
                               "build of torch (pip install torch) and triton")
    if importlib.util.find_spec("triton") is None:
        raise ConfigError("backend='triton' needs the triton package", hint="pip install triton")
