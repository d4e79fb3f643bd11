"""Every hook presso calls, in one place.

Hooks register things; none is called per node or per batch. Each is called once per
plugin when the registry is built, with a registrar that remembers which plugin added
what (so a duplicate name can name both sources). Built-in passes and backends register
through these same hooks (see ``presso.plugins.builtin``).

A third-party package exposes a module with ``@presso.plugins.hookimpl`` functions under
the entry-point group ``presso``::

    [project.entry-points.presso]
    my_plugin = "my_package.plugin"
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from presso.plugins.registry import Registrar

hookspec = pluggy.HookspecMarker("presso")
hookimpl = pluggy.HookimplMarker("presso")


@hookspec
def presso_register_passes(registrar: Registrar) -> None:
    """Add pass classes with ``registrar.add_pass(PassClass)``.

    :param registrar: records each pass under its ``name``; a name already taken by
        another plugin is an error naming both plugins.
    """


@hookspec
def presso_register_backends(registrar: Registrar) -> None:
    """Add backends with ``registrar.add_backend(name, lower)``.

    :param registrar: ``lower(graph) -> run`` turns a compiled :class:`presso.Graph`
        into ``run(*tensors) -> tuple[Tensor, ...]``.
    """


@hookspec
def presso_register_onnx_lowerings(registrar: Registrar) -> None:
    """Add ONNX translations for custom torch ops with ``registrar.add_onnx_lowering(op, fn)``.

    :param registrar: ``op`` is a ``torch.ops`` overload a pass inserts (for example
        ``torch.ops.presso.dynamic_int8_linear.default``); ``fn`` is an onnxscript function
        with the same arguments, used by ``torch.onnx.export``'s custom translation table.
    """


@hookspec
def presso_register_importances(registrar: Registrar) -> None:
    """Add pruning importances with ``registrar.add_importance(ImportanceClass)``.

    :param registrar: records each :class:`presso.passes.pruning.importance.Importance` subclass
        under its ``name``, the value of ``prune_structured(importance=...)``.
    """


@hookspec
def presso_register_adapters(registrar: Registrar) -> None:
    """Add model-family adapters with ``registrar.add_adapter(adapter)``.

    :param registrar: ``adapter`` is a :class:`presso.passes.common.adapters.Adapter`: it finds
        a family's attention modules, says how their projections are laid out and which
        attributes and config keys follow a change of head counts. A plugin's adapter is
        asked before the built-in ones.
    """
