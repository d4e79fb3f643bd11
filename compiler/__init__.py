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
from presso import runtime  # noqa: E402 - presso.runtime.load after the core is importable

__version__ = "0.1.0"

__all__ = [
    "compile", "list_importances", "list_passes", "make_pass", "CompiledModel", "Graph", "NodeInfo", "Report",
    "Pass", "PassConfig", "PassResult", "Context",
    "PressoError", "ConfigError", "TraceError", "PassError", "PluginError", "ExportError",
]
