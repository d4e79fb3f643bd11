"""Every bad input gives a PressoError that names the problem; nothing is left half-written."""
import os

import pytest
import torch
from models import build
from torch import nn

import presso
from presso import ConfigError, ExportError, PassError, TraceError
from presso.testing import assert_unchanged, snapshot


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if self.fc(x).sum() > 0:  # control flow on tensor values: torch.export cannot trace it
            return x * 2
        return x


def test_model_that_will_not_trace_names_class_and_line():
    with pytest.raises(TraceError) as info:
        presso.compile(DataDependent(), [], example_inputs=torch.randn(2, 4))
    message = str(info.value)
    assert "could not trace DataDependent" in message
    assert "test_errors.py" in message and "if self.fc(x).sum() > 0" in message
    assert "torch.cond" in message  # what to try


def test_wrong_example_inputs_name_the_signature():
    model, _ = build("mlp")
    with pytest.raises(TraceError, match=r"TinyMLP\(x, scale\) failed on the example inputs \(\(4, 7\)") as info:
        presso.compile(model, [], example_inputs=(torch.randn(4, 7), torch.tensor(1.0)))
    assert "hint" in str(info.value)


def test_not_a_module():
    with pytest.raises(presso.PressoError, match="must be a torch.nn.Module"):
        presso.compile(lambda x: x, [], example_inputs=torch.zeros(1))


@pytest.mark.parametrize("passes,match", [
    (["no_such_pass"], "unknown pass 'no_such_pass'"),
    ([42], "passes must hold Pass objects or pass names"),
])
def test_bad_pass_list(passes, match):
    model, x = build("mlp")
    with pytest.raises(ConfigError, match=match):
        presso.compile(model, passes, example_inputs=x)


def test_unknown_backend_lists_backends():
    model, x = build("mlp")
    with pytest.raises(ConfigError, match="(?s)unknown backend 'tpu'.*onnxruntime") as info:
        presso.compile(model, [], example_inputs=x, backend="tpu")
    assert "torch" in str(info.value)


def test_calling_compiled_with_wrong_inputs():
    model, x = build("mlp")
    compiled = presso.compile(model, [], example_inputs=x)
    with pytest.raises(TraceError, match="takes inputs \\['x', 'scale'\\].*missing \\['scale'\\]"):
        compiled(x[0])


def test_pass_needing_calibration_without_it():
    class NeedsData(presso.Pass):
        name = "needs_data"
        requires = frozenset({"calibration"})

        def run(self, graph, ctx):
            return presso.PassResult(graph, False)

    model, x = build("mlp")
    with pytest.raises(PassError, match="'needs_data' requires calibration") as info:
        presso.compile(model, [NeedsData()], example_inputs=x)
    assert "calibration=" in str(info.value)
    presso.compile(model, [NeedsData()], example_inputs=x, calibration=[x, x])


def test_failed_pass_leaves_callers_model_untouched():
    class Vandal(presso.Pass):
        name = "vandal"

        def run(self, graph, ctx):
            with torch.no_grad():
                for p in graph.module.parameters():
                    p.fill_(float("nan"))
            return presso.PassResult(graph, True)

    class Breaker(presso.Pass):
        name = "breaker"

        def run(self, graph, ctx):
            graph.module.fc1 = nn.Identity()
            return presso.PassResult(graph, True)

    model, x = build("mlp")
    before = snapshot(model)
    with pytest.raises(PassError, match="'vandal' produced NaN/Inf"):
        presso.compile(model, [Vandal()], example_inputs=x)
    with pytest.raises(PassError, match="no longer runs after pass 'breaker'.*passes before it: none"):
        presso.compile(model, [Breaker()], example_inputs=x)
    assert_unchanged(model, before)


def test_unwritable_export_path(tmp_path):
    model, x = build("mlp")
    compiled = presso.compile(model, [], example_inputs=x)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ExportError, match="cannot write to .*file"):
        compiled.export(blocker / "out")
    if os.geteuid() != 0:  # root ignores permissions
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ExportError, match="cannot write"):
            compiled.export(locked)


def test_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    model, x = build("mlp")
    compiled = presso.compile(model, [], example_inputs=x)
    good = compiled.export(tmp_path)
    old = good.read_bytes()

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("presso.runtime.export.write_onnx", broken)
    with pytest.raises(RuntimeError):
        compiled.export(tmp_path)
    assert good.read_bytes() == old  # the earlier artifact is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "model.onnx", "report.md"]


def test_corrupt_or_missing_artifact(tmp_path):
    with pytest.raises(ExportError, match="no ONNX model at"):
        presso.runtime.load(tmp_path / "nothing")
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(ExportError, match="not a readable ONNX model|cannot load"):
        presso.runtime.load(bad)
    model, x = build("mlp")
    path = presso.compile(model, [], example_inputs=x).export(tmp_path / "ok")
    (path.parent / "manifest.json").write_text("{ half a manifest")
    with pytest.raises(ExportError, match="not a readable manifest"):
        presso.runtime.load(path)
    path.write_bytes(path.read_bytes()[:100])  # truncated
    (path.parent / "manifest.json").unlink()
    with pytest.raises(ExportError):
        presso.runtime.load(path)
