"""Every traced architecture: compile with no pass, export, run in ONNX Runtime, compare."""
import pytest
import torch
from models import FAST_ARCHS, HF_MODELS, LOCAL_MODELS, build, fast_only, other_inputs

import presso
from presso.numerics import max_abs_error
from presso.testing import assert_unchanged, call, snapshot

TOL = 1e-4  # max abs error, float32 eager vs ONNX Runtime


@pytest.mark.parametrize("name", fast_only(HF_MODELS + LOCAL_MODELS, FAST_ARCHS))
def test_export_roundtrip_matches_original(name, tmp_path):
    model, example = build(name)
    before = snapshot(model)
    compiled = presso.compile(model, [], example_inputs=example)
    assert_unchanged(model, before)
    assert compiled.graph.dynamic, "batch and sequence dimensions should stay dynamic"

    path = compiled.export(tmp_path / name)
    assert path.exists() and (path.parent / "manifest.json").exists()
    loaded = presso.runtime.load(path.parent)
    for inputs in (example, other_inputs(name, example)):  # the second one has other shapes
        reference = call(model, inputs)
        assert max_abs_error(call(loaded, inputs), reference) < TOL
        assert max_abs_error(call(compiled, inputs), reference) < TOL
    assert_unchanged(model, before)


def test_outputs_keep_the_callers_structure():
    model, ids = build("llama")
    compiled = presso.compile(model, [], example_inputs=ids)
    out = compiled(ids)
    assert hasattr(out, "logits") and out.logits.shape == (2, 12, 96)
    mlp, (x, scale) = build("mlp")
    y, h = presso.compile(mlp, [], example_inputs=(x, scale))(x, scale)
    assert y.shape == (4, 5) and h.shape == (4, 64)


def test_graph_metadata_has_module_paths_params_and_shapes():
    model, ids = build("llama")
    graph = presso.compile(model, [], example_inputs=ids).graph
    linears = [info for _, info in graph.nodes(torch.ops.aten.linear.default)]
    q = next(i for i in linears if i.module_path == "model.layers.0.self_attn.q_proj")
    assert q.module_type == "Linear" and q.params == ("model.layers.0.self_attn.q_proj.weight",)
    assert q.shape[-1] == 32 and q.dtype == torch.float32
    assert "lm_head" in graph.called_modules()


def test_onnxruntime_backend_matches_torch():
    model, example = build("gpt2")
    compiled = presso.compile(model, [], example_inputs=example, backend="onnxruntime")
    assert compiled.report["backend_rel_error"] < 1e-5
    assert max_abs_error(call(compiled, example), call(model, example)) < TOL


def test_model_in_training_mode_is_not_touched():
    model, x = build("cnn")
    model.train()  # BatchNorm in training mode would update its running stats if run
    before = snapshot(model)
    compiled = presso.compile(model, ["quantize_dynamic_int8"], example_inputs=x)
    assert_unchanged(model, before)
    assert model.training and not compiled.module.training
