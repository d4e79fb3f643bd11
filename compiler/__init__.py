"""presso: a plugin-based compression compiler for PyTorch models.

    import presso
    cm = presso.compile(model, ["quantize_dynamic_int8"], example_inputs=x)
    cm(x); cm.export("out/"); print(cm.report.to_markdown())
"""
from presso.api import compile, list_importances, list_passes, make_pass
from presso.compiled import CompiledModel
from presso.errors import ConfigError, ExportError, PassError, PluginError, PressoError, TraceError
from presso.graph import Graph, NodeInfo
from presso.pass_api import Context, Pass, PassConfig, PassResult
from presso.report import Report

__version__ = "0.1.0"

# submodules the docs use as ``presso.X``, imported on first use (``import presso`` stays light)
_SUBMODULES = ("eval", "models", "recipes", "runtime", "testing")


def __getattr__(name: str):
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"presso.{name}")
    raise AttributeError(f"module 'presso' has no attribute {name!r}")

__all__ = [
    "compile", "list_importances", "list_passes", "make_pass", "CompiledModel", "Graph", "NodeInfo", "Report",
    "Pass", "PassConfig", "PassResult", "Context",
    "PressoError", "ConfigError", "TraceError", "PassError", "PluginError", "ExportError",
    *_SUBMODULES,
]
