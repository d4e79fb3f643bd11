"""The quantization passes on tiny models: accuracy, lowering, ONNX Runtime parity, errors."""
import onnx
import pytest
import torch
from models import FAST_ARCHS, build, fast_only, other_inputs, small_llama

import presso
from presso.passes.common.scale_groups import find_scale_groups
from presso.runtime.int8 import DynamicInt8Linear
from presso.runtime.nbits import WeightOnlyEmbedding, WeightOnlyLinear
from presso.runtime.qdq import StaticInt8Conv2d, StaticInt8Linear
from presso.testing import check_pass

ALL = ["llama", "gpt2", "bert", "opt", "qwen2", "cnn", "vit", "mlp"]


def calibration(name, example, n=4):
    torch.manual_seed(1)
    return [other_inputs(name, example) for _ in range(n)]


def op_types(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


@pytest.mark.parametrize("name", fast_only(ALL, FAST_ARCHS))
def test_static_int8_with_smoothing_is_accurate_and_runs_in_ort(name):
    model, example = build(name)
    passes = [presso.make_pass("smooth_quant", search=True), presso.make_pass("quantize_static_int8", observer="mse")]
    compiled = presso.compile(model, passes, example_inputs=example, calibration=calibration(name, example),
                              backend="onnxruntime")
    assert compiled.report["rel_error"] < 0.06  # 8-bit weights and per-tensor activations, tiny random nets
    # ONNX Runtime's fused integer convs requantize with their own rounding: a step apart at ties
    assert compiled.report["backend_rel_error"] < 5e-3
    assert compiled.report["passes"][1]["stats"]["quantized"] > 0


@pytest.mark.parametrize("name", ["llama", "gpt2", "opt", "vit"])
def test_smooth_quant_preserves_the_function(name):
    model, example = build(name)
    compiled = check_pass(presso.make_pass("smooth_quant", alpha=0.8), model, example, tolerance=1e-4,
                          calibration=calibration(name, example))
    assert compiled.report["passes"][0]["stats"]["groups"] > 0


def test_scale_groups_follow_the_graph():
    llama, example = build("llama")
    graph = presso.compile(llama, [], example_inputs=example).graph
    kinds = sorted((g.kind, len(g.consumers)) for g in find_scale_groups(graph))
    assert kinds == [("linear", 1)] * 2 + [("norm", 2)] * 2 + [("norm", 3)] * 2  # up->down, norm->gate/up, norm->qkv
    bert, example = build("bert")  # post-norm: every norm output is also the residual stream
    assert find_scale_groups(presso.compile(bert, [], example_inputs=example).graph) == []


@pytest.mark.parametrize("name,method", [
    ("llama", "rtn"), ("llama", "gptq"), ("llama", "awq"), ("llama", "awq+gptq"),
    ("gpt2", "gptq"), ("gpt2", "awq"), ("opt", "awq"), ("bert", "gptq")])
def test_weight_only_int4(name, method):
    model, example = build(name)
    p = presso.make_pass("quantize_weights", bits=4, group_size=32, method=method)
    calib = calibration(name, example) if method != "rtn" else None
    compiled = check_pass(p, model, example, tolerance=0.25, calibration=calib)
    linears = [m for m in compiled.module.modules() if isinstance(m, WeightOnlyLinear)]
    assert len(linears) == compiled.report["passes"][0]["stats"]["quantized"] > 0


def test_int8_weight_only_and_w8a8_are_close_to_float():
    model, example = build("llama")
    calib = calibration("llama", example)
    int8 = presso.compile(model, [presso.make_pass("quantize_weights", bits=8, group_size=-1)], example_inputs=example)
    assert int8.report["rel_error"] < 0.01
    w8a8 = presso.compile(model, [presso.make_pass("quantize_static_int8")], example_inputs=example, calibration=calib)
    assert w8a8.report["rel_error"] < 0.05


def _file_matches(report) -> bool:
    """The export check passed within the noise floor of int8 activations (MatMulNBits rounds
    them per block, so 1e-6 noise flips a few codes); a wrong decoding is off by order one."""
    check = report["export_check"]
    return check["rel_error"] <= check["tolerance"] and check["rel_error"] < 0.05


@pytest.mark.parametrize("symmetric", fast_only([True, False], (False,)))
def test_int4_exports_matmulnbits_and_shrinks_on_disk(symmetric, tmp_path):
    model = small_llama()
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as in SmolLM2
    ids = torch.randint(3, 2048, (1, 16))
    float_bytes = sum(p.numel() * 4 for p in model.parameters())  # tied: counted once
    p = presso.make_pass("quantize_weights", bits=4, group_size=64, symmetric=symmetric, embeddings="int4")
    compiled = presso.compile(model, [p], example_inputs=ids)
    path = compiled.export(tmp_path / "q", kv_cache=False)
    ops = op_types(path)
    assert ops.count("MatMulNBits") == 4 * 7 + 1  # every linear and the tied lm_head
    graph = onnx.load(str(path)).graph
    weights = {i.name for i in graph.initializer}
    assert {i.data_type for i in graph.initializer if "scales" in i.name} == {onnx.TensorProto.FLOAT16}
    if symmetric:  # int8 scale codes: one more compile and export, once
        int8_scales = presso.make_pass("quantize_weights", bits=4, group_size=64, embeddings="int4", scales="int8")
        smaller = presso.compile(model, [int8_scales], example_inputs=ids)
        assert smaller.export(tmp_path / "s", kv_cache=False).stat().st_size < path.stat().st_size
        assert _file_matches(smaller.report)  # ONNX Runtime decodes the scale codes alike
    assert not any(n.op_type in ("MatMul", "Gemm") and set(n.input) & weights for n in graph.node)  # no float weight
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert all((len(n.input) == 4) != symmetric for n in nbits)  # zero points only when asymmetric
    assert path.stat().st_size < 0.2 * float_bytes
    assert _file_matches(compiled.report)  # the file, in ONNX Runtime, against torch
    assert isinstance(compiled.module.model.embed_tokens, WeightOnlyEmbedding)
    # tied: the embedding and lm_head read one packed table
    assert compiled.module.lm_head.weight_q is compiled.module.model.embed_tokens.weight_q


def test_int8_weight_only_exports_matmulnbits(tmp_path):
    model, example = build("gpt2")
    compiled = presso.compile(model, [presso.make_pass("quantize_weights", bits=8, group_size=-1)],
                              example_inputs=example, backend="onnxruntime")
    # the fast 8-bit kernel rounds activations to int8 its own way (measured 3e-3 apart)
    assert compiled.report["backend_rel_error"] < 1e-2
    assert compiled.report["rel_error"] < 0.02
    assert "MatMulNBits" in op_types(compiled.export(tmp_path / "m", kv_cache=False))


def test_static_int8_exports_qdq_that_ort_fuses(tmp_path):
    model, example = build("cnn")
    compiled = presso.compile(model, ["quantize_static_int8"], example_inputs=example,
                              calibration=calibration("cnn", example), backend="onnxruntime")
    assert any(isinstance(m, StaticInt8Conv2d) for m in compiled.module.modules())
    assert any(isinstance(m, StaticInt8Linear) for m in compiled.module.modules())
    ops = op_types(compiled.export(tmp_path / "m", kv_cache=False))
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") >= 2 * ops.count("QuantizeLinear")
    assert compiled.report["backend_rel_error"] < 5e-3


@pytest.mark.slow  # one more static-int8 export of the 4-layer Llama (20 s); make test-all runs it
def test_static_int8_with_per_token_down_proj_matches_ort(tmp_path):
    model, example = build("llama")
    passes = [presso.make_pass("smooth_quant", search=True, skip=("*down_proj",)),
              presso.make_pass("quantize_static_int8", observer="mse", dynamic=("*down_proj",), skip=("lm_head",))]
    compiled = presso.compile(model, passes, example_inputs=example, calibration=calibration("llama", example),
                              backend="onnxruntime")
    modules = dict(compiled.module.named_modules())
    downs = [p for p in modules if p.endswith("down_proj")]
    assert downs and all(isinstance(modules[p], DynamicInt8Linear) and modules[p].per_token for p in downs)
    assert isinstance(modules["lm_head"], torch.nn.Linear)
    assert any(isinstance(m, StaticInt8Linear) for m in modules.values())
    stats = compiled.report["passes"][1]["stats"]
    assert stats["dynamic"] == sorted(downs) and "lm_head" in stats["skipped"]
    assert compiled.report["rel_error"] < 0.06
    assert compiled.report["backend_rel_error"] < 5e-3
    ops = op_types(compiled.export(tmp_path / "m", kv_cache=False))
    assert "MatMulInteger" in ops and "QuantizeLinear" in ops


def test_keep_sensitive_reports_what_stayed_and_why():
    model, example = build("llama")
    calib = calibration("llama", example)
    p = presso.make_pass("quantize_weights", bits=4, group_size=32, keep_sensitive=3)
    compiled = presso.compile(model, [p], example_inputs=example, calibration=calib)
    kept = compiled.report["passes"][0]["stats"]["kept_at_sensitive_bits"]
    assert len(kept) == 3 and all(err > 0 for err in kept.values())
    for path in kept:
        assert compiled.module.get_submodule(path).weight_q.fmt.bits == 8
    static = presso.compile(model, [presso.make_pass("quantize_static_int8", keep_sensitive=2)],
                            example_inputs=example, calibration=calib)
    kept = static.report["passes"][0]["stats"]["kept_in_float"]
    assert len(kept) == 2 and all(isinstance(static.module.get_submodule(p), torch.nn.Linear) for p in kept)


def test_gptq_reports_layer_by_layer_memory():
    model, example = build("llama")
    p = presso.make_pass("quantize_weights", method="gptq", group_size=32)
    compiled = presso.compile(model, [p], example_inputs=example, calibration=calibration("llama", example))
    memory = compiled.report["passes"][0]["stats"]["calibration_memory"]
    assert memory["block_inputs_bytes"] > 0 and memory["hessian_bytes"] > 0


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_whole_model_calibration_matches_the_blocks_on_the_first_block(method):
    """sequential=False calibrates every linear on the float model's inputs: the first block sees
    the same inputs either way (same codes); later blocks see the float model's, not the rounded."""
    model, example = build("llama")
    calib = calibration("llama", example)
    runs = {seq: presso.compile(model, [presso.make_pass("quantize_weights", method=method, group_size=32,
                                                         sequential=seq)], example_inputs=example, calibration=calib)
            for seq in (True, False)}
    codes = {seq: {n: b for n, b in c.module.named_buffers() if n.endswith("codes") or "packed" in n}
             for seq, c in runs.items()}
    first = [n for n in codes[True] if n.startswith("model.layers.0.")]
    later = [n for n in codes[True] if n.startswith("model.layers.1.") and "q_proj" in n]
    assert first and later
    assert all(torch.equal(codes[True][n], codes[False][n]) for n in first)
    assert not all(torch.equal(codes[True][n], codes[False][n]) for n in later)
    assert runs[False].report["passes"][0]["stats"]["block_seconds"] == []


@pytest.mark.parametrize("options,match", [
    ({"bits": 3}, "bits=3"), ({"group_size": 0}, "group_size=0"), ({"group_size": 48}, "group_size=48"),
    ({"method": "hqq"}, "method"), ({"embeddings": "int2"}, "embeddings"), ({"refit": -1}, "refit"),
    ({"scales": "bfloat16"}, "scales")])
def test_bad_weight_options_are_refused(options, match):
    with pytest.raises(presso.ConfigError, match=match):
        presso.make_pass("quantize_weights", **options)


@pytest.mark.parametrize("p", [
    "quantize_static_int8", "smooth_quant", ("quantize_weights", {"method": "gptq"}),
    ("quantize_weights", {"method": "awq"}), ("quantize_weights", {"keep_sensitive": 2})])
def test_calibration_is_required_where_it_is_used(p):
    model, example = build("mlp")
    p = presso.make_pass(p) if isinstance(p, str) else presso.make_pass(p[0], **p[1])
    with pytest.raises(presso.PassError, match="calibration"):
        presso.compile(model, [p], example_inputs=example)
    presso.compile(model, ["quantize_weights"], example_inputs=example)  # RTN needs none


def test_bad_static_options_are_refused():
    with pytest.raises(presso.ConfigError, match="observer"):
        presso.make_pass("quantize_static_int8", observer="kl")
    with pytest.raises(presso.ConfigError, match="percentile"):
        presso.make_pass("quantize_static_int8", observer="percentile", percentile=20.0)
    with pytest.raises(presso.ConfigError, match="alpha"):
        presso.make_pass("smooth_quant", alpha=1.5)


@pytest.mark.parametrize("name", ["llama", "cnn"])
def test_static_int8_alone_checks_numerics_and_leaves_the_model_unchanged(name):
    model, example = build(name)
    p = presso.make_pass("quantize_static_int8", observer="percentile")
    compiled = check_pass(p, model, example, tolerance=0.06, calibration=calibration(name, example))
    assert compiled.report["passes"][0]["stats"]["quantized"] > 0

