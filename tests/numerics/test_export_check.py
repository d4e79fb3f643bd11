"""The exported file is checked against the compiled model: a wrong lowering never ships."""
import json

import pytest
import torch
from models import build, fast_only
from onnxscript import opset18 as op

import presso
from presso.errors import ExportError
from presso.plugins.registry import get_registry
from presso.runtime import int8  # noqa: F401 - defines the custom ops

PER_TOKEN = torch.ops.presso.dynamic_int8_linear_per_token.default


def _doubled(x, weight_t, weight_scale, bias=None):
    """A lowering off by a factor of two: every output twice what the torch op computes."""
    from presso.runtime.int8 import dynamic_int8_linear_per_token_onnx

    return op.Mul(dynamic_int8_linear_per_token_onnx(x, weight_t, weight_scale, bias), op.Constant(value_float=2.0))


@pytest.fixture
def broken_lowering(monkeypatch):
    monkeypatch.setitem(get_registry().onnx_lowerings, PER_TOKEN, _doubled)


@pytest.mark.parametrize("name", ["mlp", "llama"])  # a plain graph, and a causal LM with a KV cache
def test_a_wrong_lowering_is_an_export_error_and_nothing_is_written(name, tmp_path, broken_lowering):
    model, example = build(name)
    compiled = presso.compile(model, ["quantize_dynamic_int8"], example_inputs=example)  # torch backend
    target = tmp_path / "nested" / "out"
    with pytest.raises(ExportError, match="exported ONNX file disagrees with the compiled model"):
        compiled.export(target)
    assert not (tmp_path / "nested").exists()


def test_a_wrong_lowering_keeps_an_earlier_artifact(tmp_path, monkeypatch):
    model, example = build("mlp")
    compiled = presso.compile(model, ["quantize_dynamic_int8"], example_inputs=example)
    path = compiled.export(tmp_path / "out")
    before = {f.name: f.read_bytes() for f in path.parent.iterdir()}
    monkeypatch.setitem(get_registry().onnx_lowerings, PER_TOKEN, _doubled)
    with pytest.raises(ExportError):
        compiled.export(tmp_path / "out")
    assert {f.name: f.read_bytes() for f in path.parent.iterdir()} == before


@pytest.mark.parametrize("name", ["mlp", "llama"])
def test_the_check_is_in_the_report_and_the_manifest(name, tmp_path):
    model, example = build(name)
    compiled = presso.compile(model, ["quantize_dynamic_int8"], example_inputs=example)
    path = compiled.export(tmp_path / "out")
    check = json.loads((path.parent / "manifest.json").read_text())["export_check"]
    assert check["rel_error"] < 1e-4 < check["tolerance"]
    assert check["checked_on"] == (["prefill", "decode step"] if name == "llama" else ["example inputs"])
    assert "exported ONNX file vs the compiled model" in compiled.report.to_markdown()


def test_a_quantized_model_has_a_noise_floor_far_above_a_float_one():
    from presso.numerics import perturbed, rel_error

    model, example = build("llama")
    floors = {}
    for passes in ([], ["quantize_dynamic_int8"]):
        graph = presso.compile(model, passes, example_inputs=example).graph
        base = graph.run()
        with perturbed(graph.called_modules().values()):
            floors[bool(passes)] = rel_error(graph.run(), base)
        assert rel_error(graph.run(), base) == 0.0  # the noise is gone after the block
    assert floors[False] < 1e-5 < floors[True]  # rounding decisions flip under 1e-6 of noise


def test_the_noise_floor_is_the_largest_of_several_perturbations():
    """One perturbation's floor of a quantized model is itself a noisy sample: the floor the
    checks allow against is the largest over FLOOR_SEEDS seeds, not the first seed's."""
    from presso.numerics import FLOOR_SEEDS, noise_floor, noise_floors, perturbed, rel_error

    model, example = build("llama")
    graph = presso.compile(model, ["quantize_dynamic_int8"], example_inputs=example).graph
    modules, base = graph.called_modules().values(), graph.run()
    each = []
    for seed in range(FLOOR_SEEDS):
        with perturbed(modules, seed=seed):
            each.append(rel_error(graph.run(), base))
    assert len(set(each)) == FLOOR_SEEDS  # the seeds give different samples
    assert noise_floor(modules, lambda: rel_error(graph.run(), base)) == max(each)
    twice = noise_floors(modules, lambda _reset: {"a": rel_error(graph.run(), base), "b": 0.0})
    assert twice == {"a": max(each), "b": 0.0}


@pytest.mark.parametrize("broken", fast_only([False, True], (True,)))
def test_a_large_model_waits_on_disk_while_its_file_is_checked(tmp_path, monkeypatch, request, broken):
    """Past HOLD_ON_DISK_BYTES the compiled model's tensors are emptied while ONNX Runtime runs
    the file (peak memory: the larger of the two), then read back: the model is unchanged, and
    a wrong lowering is still caught."""
    import presso.runtime.export as export
    from presso.runtime.verify import FileCheck

    if broken:
        request.getfixturevalue("broken_lowering")
    model, example = build("llama")
    compiled = presso.compile(model, ["quantize_dynamic_int8"], example_inputs=example)
    before = compiled(example).logits
    tensors = [*compiled.graph.module.parameters(), *compiled.graph.module.buffers()]
    held = []
    run_file = FileCheck.run_file

    def watched(self):
        held.append(sum(t.numel() for t in tensors))
        run_file(self)

    monkeypatch.setattr(export, "HOLD_ON_DISK_BYTES", 1)
    monkeypatch.setattr(FileCheck, "run_file", watched)
    if broken:
        with pytest.raises(ExportError, match="disagrees"):
            compiled.export(tmp_path / "out")
    else:
        compiled.export(tmp_path / "out")
        assert not list((tmp_path / "out").glob("weights-held*"))
    assert held == [0]  # every tensor emptied while the file ran
    assert torch.equal(compiled(example).logits, before)


@pytest.mark.parametrize("name", fast_only(["llama", "gpt2", "bert", "opt"], ("llama", "bert")))
def test_modules_found_by_an_eager_run_are_those_the_trace_names(name):
    """The export check's noise floor puts noise at every module that computes; one eager run
    finds the modules the trace names, without the seconds a trace costs."""
    from presso.numerics import modules_issuing_ops

    model, example = build(name)
    graph = presso.compile(model, [], example_inputs=example).graph
    eager = modules_issuing_ops(graph.module, lambda: graph.run())
    traced = list(graph.called_modules().values())
    assert len(eager) == len(traced) and {id(m) for m in eager} == {id(m) for m in traced}
