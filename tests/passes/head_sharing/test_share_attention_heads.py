"""share_attention_heads: GQA/MQA conversion on tiny models, parity in ONNX Runtime, errors."""
import pytest
import torch
from models import build, fast_only, other_inputs

import presso
from presso.errors import ConfigError
from presso.numerics import rel_error
from presso.passes.common.adapters import attentions
from presso.passes.head_sharing.head_merge import adjacent_groups, similar_groups
from presso.testing import call, check_pass

CASES = [("llama", 1, "similarity", "lstsq"), ("qwen2", 1, "adjacent", "mean"), ("gpt2", 2, "similarity", "lstsq"),
         ("gpt2", 2, "adjacent", "mean"), ("bert", 2, "similarity", "lstsq"), ("opt", 2, "similarity", "lstsq"),
         ("opt", 1, "adjacent", "mean")]


@pytest.mark.parametrize("name, kv_heads, grouping, merge",
                         fast_only(CASES, (CASES[0], ("gpt2", 2, "adjacent", "mean")), unpack=True))
def test_fewer_kv_heads_run_export_and_match_in_onnx_runtime(name, kv_heads, grouping, merge):
    model, example = build(name)
    calibration = [other_inputs(name, example) for _ in range(4)]
    p = presso.make_pass("share_attention_heads", kv_heads=kv_heads, grouping=grouping, merge=merge)
    compiled = check_pass(p, model, example, tolerance=p.tolerance, calibration=calibration,
                          backend="onnxruntime")
    assert compiled.report["backend_rel_error"] < 1e-5
    views = attentions(compiled.module)
    assert views and all(v.kv_heads == kv_heads for v in views)
    if name != "opt":  # OPT's adapted attention repeats kv heads itself
        assert all(v.module.num_key_value_groups == v.heads // kv_heads for v in views)
    assert compiled.report["params_after"] < compiled.report["params_before"]


def test_the_kv_cache_keeps_only_the_shared_heads():
    model, example = build("llama")
    compiled = presso.compile(model, [presso.make_pass("share_attention_heads", kv_heads=1)], example_inputs=example)
    with torch.no_grad():
        cache = compiled.module(example, use_cache=True).past_key_values
    assert cache.layers[0].keys.shape[1] == 1 and compiled.module.config.num_key_value_heads == 1
    out = compiled.module.generate(example[:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


def test_groupings():
    sim = torch.tensor([[1, 0, 0, .9], [0, 1, .8, 0], [0, .8, 1, 0], [.9, 0, 0, 1.]])
    assert similar_groups(sim, 2) == [[0, 3], [1, 2]]
    assert adjacent_groups(4, 2) == [[0, 1], [2, 3]]


def test_similar_heads_are_found_and_sharing_identical_heads_changes_nothing():
    model, example = build("gpt2")
    for block in model.transformer.h:  # k and v of head 3 equal head 0's, head 2 equal head 1's
        for t in (block.attn.c_attn.weight.data, block.attn.c_attn.bias.data[None]):
            for base in (32, 64):
                t[:, base + 24: base + 32] = t[:, base: base + 8]
                t[:, base + 16: base + 24] = t[:, base + 8: base + 16]
    reference = call(model, example)
    calibration = [other_inputs("gpt2", example) for _ in range(2)]
    compiled = presso.compile(model, [presso.make_pass("share_attention_heads", kv_heads=2, grouping="similarity")],
                              example_inputs=example, calibration=calibration)
    assert compiled.report["passes"][0]["stats"]["groups"]["transformer.h.0.attn"] == [[0, 3], [1, 2]]
    assert rel_error(call(compiled, example), reference) < 1e-5  # query heads were reordered to match


def test_invalid_kv_heads_names_the_divisors():
    model, example = build("llama")  # 4 query heads, 2 kv heads
    with pytest.raises(ConfigError, match="does not divide") as info:
        presso.compile(model, [presso.make_pass("share_attention_heads", kv_heads=3)], example_inputs=example)
    assert "[1, 2]" in str(info.value)
    with pytest.raises(ConfigError, match="kv_heads=0"):
        presso.make_pass("share_attention_heads", kv_heads=0)


@pytest.mark.parametrize("name", fast_only(["gpt2", "opt"], ("opt",)))
def test_mha_to_gqa_shrinks_the_exported_kv_cache_and_decodes_like_torch(name, tmp_path):
    model, example = build(name)
    compiled = presso.compile(model, [presso.make_pass("share_attention_heads", kv_heads=2)], example_inputs=example)
    decoder = presso.runtime.load(compiled.export(tmp_path / name))
    assert decoder.layout.kv_heads == 2  # was 4
    with torch.no_grad():
        cache = compiled.module(example, use_cache=True).past_key_values
    assert cache.layers[0].keys.shape[1] == 2
    prompt = example[:1, :5]
    expected = compiled.module.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(decoder.generate(prompt, max_new_tokens=6), expected)


def test_unsupported_attention_is_refused_by_name():
    model, example = build("vit")  # its attention is torch's MultiheadAttention, which no adapter knows
    with pytest.raises(ConfigError, match=f"no model-family adapter knows MultiheadAttention in "
                                          f"{type(model).__name__}") as info:
        presso.compile(model, [presso.make_pass("share_attention_heads", kv_heads=2)], example_inputs=example)
    assert "presso_register_adapters" in info.value.hint
