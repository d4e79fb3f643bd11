"""prune_structured on tiny models: groups, exact cuts, export parity, config, recovery, errors."""
import pytest
import torch
from models import FAST_ARCHS, build, fast_only, other_inputs, small_llama
from torch import nn

import presso
from presso.errors import ConfigError, PassError
from presso.graph import Graph
from presso.numerics import rel_error
from presso.passes.common.dep_groups import build_dep_graph
from presso.passes.pruning.importance import Importance
from presso.passes.pruning.recover import refit_weight
from presso.plugins import hookimpl
from presso.signature import make_call_spec, normalize_inputs
from presso.testing import call, check_pass

TARGETS = {"llama": ("heads", "mlp", "hidden"), "qwen2": ("kv_heads", "mlp"), "gpt2": ("heads", "mlp", "hidden"),
           "opt": ("heads", "mlp", "hidden"), "bert": ("heads", "mlp"), "cnn": ("channels",), "vit": ("mlp",),
           "zoo": ("channels", "hidden", "mlp")}


def prune(**options):
    return presso.make_pass("prune_structured", **options)


def dep_graph(model, example):
    inputs = normalize_inputs(example)
    with torch.no_grad():
        out = model(*inputs.args, **inputs.kwargs)
    return build_dep_graph(Graph(model, make_call_spec(model, inputs, out), inputs))


def families(name):
    return {g.family for g in dep_graph(*build(name)).groups}


def test_groups_of_a_gqa_llama():
    model, example = build("llama")
    dep = dep_graph(model, example)
    assert {g.family for g in dep.groups} == {"heads", "kv_heads", "mlp", "hidden"}
    heads = next(g for g in dep.groups if g.name == "heads:model.layers.0.self_attn")
    assert (heads.size, heads.per_block) == (4, 2)  # 4 query heads, 2 per kv head
    assert {(m.param, m.dim) for m in heads.members} == {("model.layers.0.self_attn.q_proj.weight", 0),
                                                          ("model.layers.0.self_attn.o_proj.weight", 1)}
    kv = next(g for g in dep.groups if g.name == "kv_heads:model.layers.0.self_attn")
    assert {m.param.split(".")[-2] for m in kv.members} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    hidden = next(g for g in dep.groups if g.family == "hidden")
    assert ("model.embed_tokens.weight", 1) in {(m.param, m.dim) for m in hidden.members}  # tied with lm_head


def test_fused_qkv_heads_of_gpt2_cut_three_slices():
    model, example = build("gpt2")
    heads = next(g for g in dep_graph(model, example).groups if g.name == "heads:transformer.h.0.attn")
    c_attn = next(m for m in heads.members if m.param.endswith("c_attn.weight"))
    assert c_attn.dim == 1 and c_attn.units.tolist() == [h for h in range(4) for _ in range(8)] * 3


def test_dimensions_that_must_stay_whole_are_reported():
    dep = dep_graph(*build("bert"))
    assert "hidden" not in {g.family for g in dep.groups}  # BertModel returns the hidden states
    assert "a model output keeps its shape" in dep.frozen.values()
    cnn = dep_graph(*build("cnn"))
    assert any("grouped convolution" in r for r in cnn.frozen.values())
    assert any(m.param == "depthwise.weight" for g in cnn.groups for m in g.members)  # cut with its input


def test_vision_patterns_give_uniquely_named_channel_groups():
    dep = dep_graph(*build("zoo"))
    assert len({g.name for g in dep.groups}) == len(dep.groups)
    cut_with_dense_concat = {(m.param, m.dim) for g in dep.groups for m in g.members}
    assert ("transition.1.weight", 1) in cut_with_dense_concat  # reads cat([x, layer(x)])
    assert any(g.family == "mlp" and g.name.startswith("mlp:convnext") for g in dep.groups)


def _zero_heads(model, heads_by_layer, hd=8):
    for layer, heads in zip(model.model.layers, heads_by_layer):
        for h in heads:
            layer.self_attn.q_proj.weight.data[h * hd:(h + 1) * hd] = 0
            layer.self_attn.o_proj.weight.data[:, h * hd:(h + 1) * hd] = 0


def test_cutting_units_that_contribute_nothing_leaves_outputs_exactly_unchanged():
    model, example = build("llama")
    _zero_heads(model, [(1, 2), (0, 3)])  # one query head of each kv head, per layer
    for layer in model.model.layers:
        mlp, idx = layer.mlp, torch.arange(0, 64, 2)
        mlp.gate_proj.weight.data[idx] = 0
        mlp.up_proj.weight.data[idx] = 0
        mlp.down_proj.weight.data[:, idx] = 0
    reference = call(model, example)
    compiled = presso.compile(model, [prune(target=("heads", "mlp"), ratio=0.5)], example_inputs=example)
    assert rel_error(call(compiled, example), reference) < 1e-6
    layer = compiled.module.model.layers[0]
    assert layer.self_attn.q_proj.out_features == 16 and layer.mlp.up_proj.out_features == 32


@pytest.mark.parametrize("name", fast_only(sorted(TARGETS), FAST_ARCHS))
def test_pruned_models_export_and_match_in_onnx_runtime(name):
    model, example = build(name)
    p = prune(target=TARGETS[name], ratio=0.5)
    compiled = check_pass(p, model, example, tolerance=p.tolerance, backend="onnxruntime")
    stats = compiled.report["passes"][0]["stats"]
    assert compiled.report["params_after"] < compiled.report["params_before"] == stats["params_before"]
    assert set(stats["removed"]) == set(TARGETS[name]) or name == "qwen2"
    other = other_inputs(name, example)  # another batch and sequence length: dynamic shapes survive
    assert rel_error(call(compiled, other), call(compiled.module, other)) < 1e-5


def test_params_ratio_is_met_within_one_percent_and_round_to_holds():
    model = small_llama()
    example = torch.randint(3, 2000, (1, 16))
    compiled = presso.compile(model, [prune(target=("heads", "mlp"), params_ratio=0.2, round_to=16)],
                              example_inputs=example)
    stats = compiled.report["passes"][0]["stats"]
    assert abs(stats["params_removed"] - 0.2) <= 0.01
    sizes = {layer.mlp.up_proj.out_features for layer in compiled.module.model.layers}
    assert len(sizes) == 1 and sizes.pop() % 16 == 0


def test_config_follows_so_generate_and_save_pretrained_work(tmp_path):
    model, example = build("llama")
    compiled = presso.compile(model, [prune(target=("heads", "mlp", "hidden"), ratio=0.5)], example_inputs=example)
    pruned = compiled.module
    config = compiled.report["passes"][0]["stats"]["config"]
    assert config["hidden_size"] == 16 and config["intermediate_size"] == 32 and "not_expressible" not in config
    out = pruned.generate(example[:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)
    pruned.save_pretrained(tmp_path)
    reloaded = type(pruned).from_pretrained(tmp_path).eval()
    assert rel_error(call(reloaded, example), call(pruned, example)) < 1e-6


def test_global_scope_may_give_layers_different_widths_and_says_so():
    model = small_llama()
    example = torch.randint(3, 2000, (1, 16))
    compiled = presso.compile(model, [prune(target=("mlp",), ratio=0.3, scope="global")], example_inputs=example)
    widths = [layer.mlp.up_proj.out_features for layer in compiled.module.model.layers]
    assert sum(768 - w for w in widths) == pytest.approx(0.3 * 768 * 4, abs=8)
    if len(set(widths)) > 1:
        assert compiled.report["passes"][0]["stats"]["config"]["not_expressible"]


def test_protected_modules_keep_their_groups():
    model, example = build("llama")
    compiled = presso.compile(model, [prune(target=("mlp",), ratio=0.5, protect=("model.layers.0.*",))],
                              example_inputs=example)
    layers = compiled.module.model.layers
    assert layers[0].mlp.up_proj.out_features == 64 and layers[1].mlp.up_proj.out_features == 32
    stats = compiled.report["passes"][0]["stats"]
    assert stats["skipped"] == {"mlp:model.layers.0.mlp": "protected"}
    assert "mlp: layers differ ([32, 64])" in stats["config"]["not_expressible"]


def test_least_squares_refit_beats_dropping_columns():
    torch.manual_seed(0)
    x = torch.randn(512, 24) @ torch.randn(24, 24)  # correlated inputs
    w = torch.randn(10, 24)
    keep = torch.rand(24) > 0.4
    refit = refit_weight(w, x.t() @ x, keep)
    target = x @ w.t()
    assert (x[:, keep] @ refit.t() - target).norm() < 0.8 * (x[:, keep] @ w[:, keep].t() - target).norm()


def test_recovery_lowers_the_calibration_loss():
    model = small_llama()
    torch.manual_seed(0)
    calibration = [torch.randint(3, 2000, (2, 32)) for _ in range(4)]
    compiled = presso.compile(model, [prune(target=("heads", "mlp"), ratio=0.4, importance="activation",
                                            recover=True)], example_inputs=calibration[0], calibration=calibration)
    stats = compiled.report["passes"][0]["stats"]
    assert stats["calibration_loss_after_recovery"] < stats["calibration_loss_before_recovery"]
    assert "model.layers.0.mlp.down_proj" in stats["recovered_layers"]


@pytest.mark.parametrize("importance", ["magnitude_l1", "taylor", "activation"])
def test_each_importance_runs(importance):
    model, example = build("llama")
    calibration = [other_inputs("llama", example) for _ in range(2)]
    compiled = presso.compile(model, [prune(target=("heads", "mlp"), ratio=0.25, importance=importance)],
                              example_inputs=example, calibration=calibration)
    assert compiled.report["params_after"] < compiled.report["params_before"]


class KeepLastUnits(Importance):
    name = "keep_last_units"

    def score(self, group, ev, aggregate="sum"):
        return torch.arange(group.size, dtype=torch.float)


class _Plugin:
    @hookimpl
    def presso_register_importances(self, registrar):
        registrar.add_importance(KeepLastUnits)


def test_a_plugin_importance_decides_what_is_cut(fresh_registry):
    fresh_registry({"keep-last": _Plugin()})
    model, example = build("llama")
    compiled = presso.compile(model, [prune(target=("mlp",), ratio=0.5, importance="keep_last_units")],
                              example_inputs=example)
    up = model.model.layers[0].mlp.up_proj.weight
    assert torch.equal(compiled.module.model.layers[0].mlp.up_proj.weight, up[32:])


@pytest.mark.parametrize("options, message", [
    (dict(target=("rows",), ratio=0.2), "unknown prune target"),
    (dict(target=("mlp",)), "exactly one of ratio"),
    (dict(target=("mlp",), ratio=0.2, params_ratio=0.2), "exactly one of ratio"),
    (dict(target=("mlp",), ratio=1.5), "must be in (0, 1)"),
    (dict(target=("mlp",), ratio=0.2, importance="psychic"), "unknown importance"),
    (dict(target=("mlp",), ratio=0.2, round_to=0), "round_to"),
])
def test_bad_options_are_refused_by_name(options, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        prune(**options)


def test_a_target_the_model_does_not_have_names_what_it_has():
    model, example = build("bert")
    with pytest.raises(ConfigError, match="nothing to prune for target") as info:
        presso.compile(model, [prune(target=("hidden",), ratio=0.2)], example_inputs=example)
    assert "heads, mlp" in str(info.value) and "model output" in str(info.value)


def test_calibrated_importances_and_recovery_need_calibration():
    model, example = build("llama")
    for options in (dict(importance="taylor"), dict(recover=True)):
        with pytest.raises(PassError, match="requires calibration"):
            presso.compile(model, [prune(target=("mlp",), ratio=0.2, **options)], example_inputs=example)


def test_an_unresizable_module_is_left_whole():
    model, example = build("vit")
    with pytest.raises(ConfigError, match="MultiheadAttention 'attn' cannot be resized"):
        presso.compile(model, [prune(target=("hidden",), ratio=0.2)], example_inputs=example)
    assert isinstance(model.attn, nn.MultiheadAttention)
