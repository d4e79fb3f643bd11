"""Fused decoders: ONNX Runtime's fused operators where they cover the model, the exporter's
graph elsewhere, the same tokens either way."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto
from onnx import helper as oh

import presso
from presso.runtime.fused.attention import group_query_attention
from presso.runtime.fused.norms import skip_rms_norm
from tests.models import build, fast_only


def tiny(family: str, heads: int = 4, kv_heads: int = 2, layers: int = 2) -> torch.nn.Module:
    """A decoder of ``family`` with a head size of 16 (GroupQueryAttention needs a multiple of 16)."""
    import transformers as tf

    torch.manual_seed(0)
    config = getattr(tf, {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "mistral": "MistralConfig"}[family])(
        vocab_size=128, hidden_size=16 * heads, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, **({"sliding_window": None} if family == "mistral" else {}))
    model_class = {"llama": tf.LlamaForCausalLM, "qwen2": tf.Qwen2ForCausalLM, "mistral": tf.MistralForCausalLM}
    return model_class[family](config).eval()


IDS = torch.randint(3, 120, (1, 12), generator=torch.Generator().manual_seed(0))
CALIBRATION = [torch.randint(3, 120, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]


def export_both(compiled, tmp_path):
    """The fused and the unfused file, their manifests, and 8 greedy tokens from each."""
    runs = {}
    for fuse in (True, False):
        path = compiled.export(tmp_path / f"fuse-{fuse}", fuse=fuse)
        manifest = json.loads((path.parent / "manifest.json").read_text())
        tokens = presso.runtime.load(path).generate(IDS[:, :6], max_new_tokens=8)
        runs[fuse] = manifest, tokens
    return runs


@pytest.mark.parametrize("family", fast_only(["llama", "qwen2", "mistral"], ("llama",)))
def test_each_family_exports_fused_with_the_tokens_of_the_unfused_graph(family, tmp_path):
    compiled = presso.compile(tiny(family), [], example_inputs=IDS)
    runs = export_both(compiled, tmp_path)
    fused, plain = runs[True][0], runs[False][0]
    assert fused["fusions"]["operators"] == {"GroupQueryAttention": 2, "SkipSimplifiedLayerNormalization": 4}
    assert fused["fusions"]["nodes"] < plain["fusions"]["nodes"] / 3
    assert "not_fused" not in fused["fusions"] and fused["export_check"]["rel_error"] < 1e-4
    assert torch.equal(runs[True][1], runs[False][1])
    assert "not fused: fusion turned off" in compiled.report.to_markdown()  # the last export's report


PACKED_BOTH = {"qkv": 2, "gate_up": 2}  # every layer's q/k/v and gate/up as one matmul each


def fast_compression(case) -> bool:
    """int4, both int8 lowerings and one structural change in make test; the rest in make test-all."""
    steps = case[0]
    return steps[-1][0] in ("quantize_dynamic_int8", "quantize_static_int8", "share_attention_heads") \
        or steps[0][1].get("bits") == 4


@pytest.mark.parametrize("steps,packed", fast_only([
    ([("quantize_weights", {"bits": 4, "group_size": 16})], PACKED_BOTH),
    ([("quantize_weights", {"bits": 8, "group_size": 16, "embeddings": "int8"})], PACKED_BOTH),
    ([("quantize_dynamic_int8", {})], PACKED_BOTH),
    ([("smooth_quant", {}), ("quantize_static_int8", {})], PACKED_BOTH),
    ([("prune_structured", {"ratio": 0.25})], {"qkv": 0, "gate_up": 0}),
    ([("split_low_rank", {"ratio": 0.3, "method": "svd"})], {"qkv": 0, "gate_up": 0}),
    ([("share_attention_heads", {"kv_heads": 1})], {"qkv": 0, "gate_up": 0}),
], fast_compression, unpack=True), ids=lambda v: "+".join(n for n, _ in v) if isinstance(v, list) else "")
def test_compressed_models_export_fused_or_say_why_not(steps, packed, tmp_path):
    """Every compressed form either fuses, checked against the compiled model like any export,
    or keeps the exporter's graph with the reason in the manifest; the tokens agree. Quantized
    q/k/v and gate/up run as one packed matmul; float ones (pruned, factored) one by one."""
    passes = [presso.make_pass(n, **o) for n, o in steps]
    compiled = presso.compile(tiny("llama", heads=8, kv_heads=4), passes, example_inputs=IDS,
                              calibration=CALIBRATION)
    runs = export_both(compiled, tmp_path)
    fusions = runs[True][0]["fusions"]
    assert fusions["operators"].get("GroupQueryAttention") == 2 or fusions["not_fused"]
    assert fusions.get("packed") == packed
    assert torch.equal(runs[True][1], runs[False][1])


@pytest.mark.parametrize("name,reason", fast_only([("llama", "head size 8"), ("gpt2", "model type 'gpt2'"),
                                                    ("phi3", "model type 'phi3'")], lambda case: case[0] != "phi3",
                                                   unpack=True))
def test_models_the_fused_forward_does_not_cover_keep_the_exporters_graph(name, reason, tmp_path):
    model, example = build(name)
    path = presso.compile(model, [], example_inputs=example).export(tmp_path / "m")
    fusions = json.loads((path.parent / "manifest.json").read_text())["fusions"]
    assert reason in fusions["not_fused"] and "GroupQueryAttention" not in fusions["operators"]


def _run_node(node, inputs: dict[str, np.ndarray], outputs: list[str], initializers=()) -> list[np.ndarray]:
    kind = {np.dtype("float32"): TensorProto.FLOAT, np.dtype("int32"): TensorProto.INT32}
    graph = oh.make_graph([node], "g", [oh.make_tensor_value_info(n, kind[a.dtype], a.shape)
                                        for n, a in inputs.items()],
                          [oh.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs], list(initializers))
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18), oh.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, inputs)


@pytest.mark.parametrize("batch,past,new", [(2, 0, 3), (2, 5, 1), (1, 5, 3)])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4), (4, 1)])
def test_group_query_attention_reference_matches_onnx_runtime(batch, past, new, heads, kv_heads):
    """The torch reference (what the trace and the export check run) against the kernel, for
    a prompt (no past), a step after a cache and a chunk after a cache (the kernel takes
    chunks in batches of one); GQA, MHA and MQA."""
    gen = torch.Generator().manual_seed(0)
    d, positions = 32, 64
    q = torch.randn(batch, new, heads * d, generator=gen)
    k, v = (torch.randn(batch, new, kv_heads * d, generator=gen) for _ in range(2))
    past_k, past_v = (torch.randn(batch, kv_heads, past, d, generator=gen) for _ in range(2))
    angles = torch.arange(positions)[:, None] * torch.rand(d // 2, generator=gen)[None]
    cos, sin = angles.cos(), angles.sin()
    seqlens = torch.full((batch,), past + new - 1, dtype=torch.int32)
    total = torch.tensor(past + new, dtype=torch.int32)
    want = group_query_attention(q, k, v, past_k, past_v, seqlens, total, cos, sin, heads, kv_heads, d ** -0.5)
    node = oh.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "seqlens", "total", "cos", "sin"],
                        ["out", "present_k", "present_v"], domain="com.microsoft", num_heads=heads,
                        kv_num_heads=kv_heads, scale=d ** -0.5, do_rotary=1)
    feeds = dict(q=q, k=k, v=v, pk=past_k, pv=past_v, seqlens=seqlens, total=total)
    got = _run_node(node, {n: t.numpy() for n, t in feeds.items()}, ["out", "present_k", "present_v"],
                    [onnx.numpy_helper.from_array(t.numpy(), n) for n, t in (("cos", cos), ("sin", sin))])
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-4, atol=1e-5)


def test_skip_rms_norm_reference_matches_onnx_runtime():
    gen = torch.Generator().manual_seed(0)
    x, skip, weight = torch.randn(2, 5, 64, generator=gen), torch.randn(2, 5, 64, generator=gen), torch.rand(64)
    want = skip_rms_norm(x, skip, weight, 1e-5)
    node = oh.make_node("SkipSimplifiedLayerNormalization", ["x", "skip", "w"], ["out", "", "", "sum"],
                        domain="com.microsoft", epsilon=1e-5)
    got = _run_node(node, {"x": x.numpy(), "skip": skip.numpy(), "w": weight.numpy()}, ["out", "sum"])
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-5, atol=1e-5)


def test_onnxruntime_genai_runs_the_folder_with_presso_decoders_tokens(tmp_path):
    """The exported folder as it is (genai_config.json beside the model) in onnxruntime-genai's
    own generator: the same 32 greedy tokens as presso's decoder."""
    og = pytest.importorskip("onnxruntime_genai")
    compiled = presso.compile(tiny("llama"), [presso.make_pass("quantize_weights", bits=4, group_size=16)],
                              example_inputs=IDS)
    path = compiled.export(tmp_path / "m")
    want = presso.runtime.load(path).generate(IDS[:, :6], max_new_tokens=32)[0, 6:].tolist()
    model = og.Model(str(path.parent))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=6 + 32, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(IDS[:, :6].numpy().astype(np.int32))
    got = []
    while not generator.is_done():
        generator.generate_next_token()
        got.append(int(generator.get_next_tokens()[0]))
    assert got == want


def test_unfused_exports_write_no_genai_config(tmp_path):
    path = presso.compile(tiny("llama"), [], example_inputs=IDS).export(tmp_path / "m", fuse=False)
    assert not (path.parent / "genai_config.json").exists()


def test_decoding_in_place_gives_the_logits_of_a_copied_cache(tmp_path):
    """A fused decoder's runs share one cache buffer between past and present (the kernel writes
    into it); every step's logits equal those of feeding and taking back the cache, in a batch
    of two, and a run past its capacity is refused."""
    from presso.errors import ExportError
    from presso.runtime.decoder import CopiedCacheRun

    compiled = presso.compile(tiny("llama"), [presso.make_pass("quantize_weights", bits=4, group_size=16)],
                              example_inputs=IDS)
    decoder = presso.runtime.load(compiled.export(tmp_path / "m"))
    assert decoder.shares_cache
    shared, copied = decoder.start(2, 9), CopiedCacheRun(decoder, 2)
    tokens = torch.randint(3, 120, (2, 6), generator=torch.Generator().manual_seed(1)).numpy()
    for ids in (tokens, tokens[:, :1], tokens[:, 1:2], tokens[:, 2:3]):
        np.testing.assert_allclose(shared.step(ids), copied.step(ids), rtol=1e-5, atol=1e-5)
    with pytest.raises(ExportError, match="holds 9 positions"):
        shared.step(tokens[:, :1])
