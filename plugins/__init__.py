"""presso's plugin system: hookspecs, the registry, entry-point discovery."""
from presso.plugins.hookspecs import hookimpl, hookspec
from presso.plugins.registry import (
    ENTRY_POINT_GROUP,
    PluginFailure,
    Registrar,
    Registry,
    get_registry,
    reload_plugins,
)

__all__ = ["hookimpl", "hookspec", "ENTRY_POINT_GROUP", "PluginFailure", "Registrar", "Registry",
           "get_registry", "reload_plugins"]
