"""Model-family adapters: every family's attention read right, pruning through them on fused layouts."""
import pytest
import torch
from models import build, fast_only

import presso
from presso.passes.common.adapters import AdapterError, attentions

# family -> (query heads, kv heads, fused q/k/v projection) of the tiny models
EXPECTED = {"llama": (4, 2, False), "qwen2": (4, 2, False), "gpt2": (4, 4, True), "opt": (4, 4, False),
            "bert": (4, 4, False), "phi3": (4, 2, True), "falcon": (4, 1, True)}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_family_is_read_by_its_adapter(name):
    model, _ = build(name)
    found = attentions(model)
    heads, kv_heads, fused = EXPECTED[name]
    assert len(found) == 2 and {a.adapter.name for a in found} == {"llama" if name == "qwen2" else name}
    assert all((a.heads, a.kv_heads, a.fused) == (heads, kv_heads, fused) for a in found)


def test_an_attention_no_adapter_knows_is_named_with_the_hook():
    model, _ = build("vit")  # torch's nn.MultiheadAttention
    with pytest.raises(AdapterError, match="no model-family adapter knows MultiheadAttention in TinyViT") as info:
        attentions(model)
    assert "presso_register_adapters" in info.value.hint
    assert attentions(model, required=False) == []


@pytest.mark.parametrize("name, target", fast_only([("phi3", ("mlp",)), ("falcon", ("mlp",)), ("phi3", ("heads",)),
                                                    ("falcon", ("heads",))],
                                                   (("phi3", ("mlp",)), ("falcon", ("heads",))), unpack=True))
def test_fused_projections_prune_and_match_in_onnx_runtime(name, target):
    model, example = build(name)
    p = presso.make_pass("prune_structured", ratio=0.5, target=target)
    compiled = presso.compile(model, [p], example_inputs=example, backend="onnxruntime")
    assert compiled.report["params_after"] < compiled.report["params_before"]
    assert compiled.report["backend_rel_error"] < 1e-4
    found = attentions(compiled.module)
    if target == ("heads",):
        assert all(a.heads == 2 for a in found)
        config = compiled.module.config
        if name == "phi3":  # its forward reads the head count from the shared config
            assert config.num_attention_heads == 2
    with torch.no_grad():  # and the rewritten model keeps running at other shapes
        compiled.module(torch.randint(3, 90, (3, 7)))


def test_phi3s_fused_kv_heads_merge_and_match_in_onnx_runtime():
    model, example = build("phi3")
    compiled = presso.compile(model, [presso.make_pass("share_attention_heads", kv_heads=1)], example_inputs=example,
                              backend="onnxruntime")
    assert compiled.report["backend_rel_error"] < 1e-4
    assert all((a.heads, a.kv_heads) == (4, 1) for a in attentions(compiled.module))
    assert compiled.module.config.num_key_value_heads == 1


def test_shared_input_statistics_are_shared_only_by_linears_reading_one_tensor():
    from presso.passes.common.blocks import walk_blocks
    from presso.passes.common.stats import SharedInputStats

    model, example = build("llama")
    graph = presso.compile(model, [], example_inputs=example).graph
    from presso.signature import normalize_inputs

    step = next(walk_blocks(graph, [normalize_inputs(example)] * 2))
    names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj")
    linears = {n: step.block.get_submodule(n) for n in names}
    with SharedInputStats(linears) as collector:
        step.run(collector.new_batch)
    s = collector.stats
    assert s["self_attn.q_proj"] is s["self_attn.k_proj"] and s["mlp.gate_proj"] is s["mlp.up_proj"]
    # o_proj and the MLP read other tensors, whatever addresses the allocator reuses
    assert len({id(s[n]) for n in names}) == 3
