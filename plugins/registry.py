"""The registry of passes, backends and ONNX lowerings, filled by pluggy hooks.

Plugins come from the entry-point group ``presso`` plus the built-in plugin. A plugin that
fails to import or to register is reported (``Registry.failures``, a warning) and skipped;
a duplicate name is a :class:`PluginError` naming both sources.
"""
from __future__ import annotations

import importlib.metadata as md
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from presso.errors import PluginError
from presso.plugins import hookspecs

ENTRY_POINT_GROUP = "presso"
BUILTIN = "presso (built-in)"


@dataclass(frozen=True)
class PluginFailure:
    plugin: str
    error: str

    def __str__(self) -> str:
        return f"plugin {self.plugin!r} was skipped: {self.error}"


@dataclass
class Registry:
    passes: dict[str, type] = field(default_factory=dict)
    backends: dict[str, Callable] = field(default_factory=dict)
    onnx_lowerings: dict[Any, Callable] = field(default_factory=dict)
    importances: dict[str, type] = field(default_factory=dict)
    adapters: list = field(default_factory=list)  # model-family adapters, plugins' before the built-ins
    sources: dict[tuple[str, str], str] = field(default_factory=dict)  # (kind, name) -> plugin
    plugins: dict[str, str] = field(default_factory=dict)  # plugin -> version
    failures: list[PluginFailure] = field(default_factory=list)

    def source_of(self, kind: str, name: Any) -> str:
        return self.sources[(kind, name)]


class Registrar:
    """What a hook receives: adds entries to the registry on behalf of one plugin."""

    def __init__(self, registry: Registry, plugin: str):
        self._registry = registry
        self.plugin = plugin

    def add_pass(self, pass_cls: type) -> None:
        name = getattr(pass_cls, "name", None)
        if not isinstance(name, str) or not name.isidentifier():
            raise PluginError(f"plugin {self.plugin!r} registered {pass_cls!r} without a snake_case `name`")
        self._add("pass", name, pass_cls, self._registry.passes)

    def add_backend(self, name: str, lower: Callable) -> None:
        self._add("backend", name, lower, self._registry.backends)

    def add_importance(self, importance_cls: type) -> None:
        name = getattr(importance_cls, "name", None)
        if not isinstance(name, str) or not name.isidentifier():
            raise PluginError(f"plugin {self.plugin!r} registered {importance_cls!r} without a snake_case `name`")
        self._add("importance", name, importance_cls, self._registry.importances)

    def add_adapter(self, adapter: Any) -> None:
        """A model-family adapter (``presso.passes.common.adapters.Adapter``); a plugin's adapter is
        asked before the built-in ones, so it can take over a family."""
        name = getattr(adapter, "name", None)
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {self.plugin!r} registered {adapter!r} without a `name`")
        if any(a.name == name for a in self._registry.adapters):
            raise PluginError(f"adapter {name!r} is registered twice: by "
                              f"{self._registry.sources[('adapter', name)]!r} and by {self.plugin!r}",
                              hint="uninstall one of the two plugins, or rename the adapter in one of them")
        builtin = self.plugin == BUILTIN
        self._registry.adapters.insert(len(self._registry.adapters) if builtin else 0, adapter)
        self._registry.sources[("adapter", name)] = self.plugin

    def add_onnx_lowering(self, op: Any, fn: Callable) -> None:
        self._add("onnx lowering", op, fn, self._registry.onnx_lowerings)

    def _add(self, kind: str, name: Any, value: Any, table: dict) -> None:
        if name in table:
            raise PluginError(
                f"{kind} {name!r} is registered twice: by {self._registry.sources[(kind, name)]!r} "
                f"and by {self.plugin!r}",
                hint="uninstall one of the two plugins, or rename the pass in one of them",
            )
        table[name] = value
        self._registry.sources[(kind, name)] = self.plugin


def build_registry(extra_plugins: dict[str, object] | None = None) -> Registry:
    """Load the built-in plugin, every entry-point plugin and ``extra_plugins``, then ask each."""
    from presso.plugins import builtin

    pm = pluggy.PluginManager("presso")
    pm.add_hookspecs(hookspecs)
    registry = Registry()
    pm.register(builtin, name=BUILTIN)
    registry.plugins[BUILTIN] = _version("presso")
    for name, plugin in _entry_point_plugins(registry):
        pm.register(plugin, name=name)
    for name, plugin in (extra_plugins or {}).items():
        pm.register(plugin, name=name)
        registry.plugins[name] = "local"
    for hook in ("presso_register_backends", "presso_register_onnx_lowerings", "presso_register_importances",
                 "presso_register_adapters", "presso_register_passes"):
        for impl in getattr(pm.hook, hook).get_hookimpls():
            _call(pm, hook, impl.plugin_name, registry)
    return registry


def _call(pm: pluggy.PluginManager, hook: str, plugin: str, registry: Registry) -> None:
    """One plugin's implementation, through pluggy's hook caller (tracing, monitoring and the
    plugin's own wrappers apply); one caller per plugin, so that each registrar knows whose
    names it records and a broken plugin is skipped alone."""
    others = [p for name, p in pm.list_name_plugin() if name != plugin]
    caller = pm.subset_hook_caller(hook, remove_plugins=others)
    try:
        caller(registrar=Registrar(registry, plugin))
    except PluginError:
        raise
    except Exception as exc:  # noqa: BLE001 - a broken third-party plugin is skipped, not fatal
        if plugin == BUILTIN:  # a broken install of presso itself must not pass silently
            raise
        _fail(registry, plugin, f"{hook} raised {type(exc).__name__}: {exc}")


def _entry_point_plugins(registry: Registry):
    for ep in md.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist else "?"
        name = f"{dist}:{ep.name}"
        try:
            plugin = ep.load()
        except Exception as exc:  # noqa: BLE001 - report and skip
            _fail(registry, name, f"import of {ep.value!r} failed with {type(exc).__name__}: {exc}")
            continue
        registry.plugins[name] = ep.dist.version if ep.dist else "?"
        yield name, plugin


def _fail(registry: Registry, plugin: str, error: str) -> None:
    failure = PluginFailure(plugin, error)
    registry.failures.append(failure)
    warnings.warn(str(failure), RuntimeWarning, stacklevel=3)


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "unknown"


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, built on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = build_registry()
    return _REGISTRY


def reload_plugins(extra_plugins: dict[str, object] | None = None) -> Registry:
    """Rebuild the registry (after installing or removing a plugin in this process)."""
    global _REGISTRY
    _REGISTRY = build_registry(extra_plugins)
    return _REGISTRY
