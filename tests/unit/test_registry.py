import textwrap
import types

import pytest
from models import build

import presso
from presso import Pass, PassResult, PluginError
from presso.plugins import hookimpl


class Twin(Pass):
    name = "quantize_dynamic_int8"

    def run(self, graph, ctx):
        return PassResult(graph, False)


def plugin_with(*passes):
    @hookimpl
    def presso_register_passes(registrar):
        for p in passes:
            registrar.add_pass(p)

    return plugin_module(presso_register_passes)


def plugin_module(*hooks) -> types.ModuleType:
    """A plugin as third parties ship one: a module holding hook implementations."""
    module = types.ModuleType("a_plugin")
    for hook in hooks:
        setattr(module, hook.__name__, hook)
    return module


def test_builtins_come_through_the_hook(fresh_registry):
    registry = fresh_registry()
    assert registry.source_of("pass", "quantize_dynamic_int8") == "presso (built-in)"
    assert {"torch", "onnxruntime"} <= set(registry.backends)


def test_duplicate_pass_name_names_both_sources(fresh_registry):
    with pytest.raises(PluginError, match="registered twice: by 'presso \\(built-in\\)' and by 'acme'"):
        fresh_registry({"acme": plugin_with(Twin)})


def test_local_plugin_pass_is_listed_and_usable(fresh_registry):
    class Noop(Pass):
        name = "noop_local"

        def run(self, graph, ctx):
            return PassResult(graph, False)

    fresh_registry({"local": plugin_with(Noop)})
    assert "noop_local" in presso.list_passes()
    assert isinstance(presso.make_pass("noop_local"), Noop)


def test_hook_that_raises_is_reported_and_skipped(fresh_registry):
    @hookimpl
    def presso_register_passes(registrar):
        raise RuntimeError("cannot register")

    with pytest.warns(RuntimeWarning, match="'broken' was skipped: presso_register_passes raised RuntimeError"):
        registry = fresh_registry({"broken": plugin_module(presso_register_passes)})
    assert [f.plugin for f in registry.failures] == ["broken"]
    assert "quantize_dynamic_int8" in registry.passes


def test_pass_without_name_is_refused(fresh_registry):
    class Nameless(Pass):
        def run(self, graph, ctx):
            return PassResult(graph, False)

    with pytest.raises(PluginError, match="without a snake_case `name`"):
        fresh_registry({"bad": plugin_with(Nameless)})


def test_entry_point_that_fails_to_import_is_reported(fresh_registry, tmp_path, monkeypatch):
    dist = tmp_path / "broken_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[presso]\nbroken = broken_plugin_mod\n")
    (tmp_path / "broken_plugin_mod.py").write_text(textwrap.dedent("""
        raise ImportError("this plugin needs libfoo")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(RuntimeWarning, match="broken-plugin:broken' was skipped: import of 'broken_plugin_mod'"):
        registry = fresh_registry()
    assert registry.failures and "libfoo" in registry.failures[0].error
    assert "quantize_dynamic_int8" in registry.passes


def test_a_plugin_adapter_is_asked_before_the_builtin_ones(fresh_registry):
    from presso.passes.common.adapters import adapter_for
    from presso.passes.common.adapters.llama import LlamaAdapter

    class MyLlama(LlamaAdapter):
        name = "my_llama"

    @hookimpl
    def presso_register_adapters(registrar):
        registrar.add_adapter(MyLlama())

    registry = fresh_registry({"acme": plugin_module(presso_register_adapters)})
    assert [a.name for a in registry.adapters][:2] == ["my_llama", "llama"]
    model, _ = build("llama")
    assert adapter_for(model.model.layers[0].self_attn).name == "my_llama"


def test_every_source_package_is_in_the_wheel():
    """A folder with an __init__.py that pyproject does not list is missing from a non-editable install."""
    from pathlib import Path

    import tomllib

    root = Path(__file__).resolve().parents[2]
    tool = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    dirs = {v: k for k, v in tool["package-dir"].items()}
    found = set()
    for folder, package in dirs.items():
        for init in (root / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(root / folder).parts
            found.add(".".join((package, *rel)))
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"
