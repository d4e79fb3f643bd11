import onnx
import pytest
import torch
from models import build, fast_only

import presso
from presso.numerics import max_abs_error, rel_error
from presso.runtime.int8 import DynamicInt8Linear
from presso.testing import call, check_pass

TOL = 0.05  # relative L2 error of the outputs on these tiny random models, int8 weights and activations


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "opt", "qwen2", "cnn", "vit", "mlp"])
def test_accuracy_and_no_mutation(name):
    model, example = build(name)
    compiled = check_pass(presso.make_pass("quantize_dynamic_int8"), model, example, tolerance=TOL)
    assert compiled.report["passes"][0]["stats"]["quantized"] > 0
    assert compiled.report["bytes_after"] < compiled.report["bytes_before"]


@pytest.mark.parametrize("name,activations,quantizer", fast_only([
    ("llama", "per_token", "Cast"), ("gpt2", "per_token", "Cast"), ("bert", "per_token", "Cast"),
    ("bert", "per_tensor", "DynamicQuantizeLinear")],
    (("llama", "per_token", "Cast"), ("bert", "per_tensor", "DynamicQuantizeLinear")), unpack=True))
def test_onnx_uses_integer_matmul_and_agrees_with_torch(name, activations, quantizer, tmp_path):
    model, example = build(name)
    compiled = presso.compile(model, [presso.make_pass("quantize_dynamic_int8", activations=activations)],
                              example_inputs=example)
    path = compiled.export(tmp_path, kv_cache=False)
    nodes = onnx.load(str(path)).graph.node
    producer = {out: n.op_type for n in nodes for out in n.output}
    matmuls = [n for n in nodes if n.op_type == "MatMulInteger"]
    n_linear = compiled.report["passes"][0]["stats"]["quantized"]
    assert len(matmuls) == n_linear
    # every integer matmul reads quantized activations (q/k/v share one: deduplicated)
    assert all(producer[m.input[0]] == quantizer for m in matmuls)
    loaded = presso.runtime.load(path)
    assert rel_error(call(loaded, example), call(compiled, example)) < 1e-4
    int8_initializers = [i for i in onnx.load(str(path)).graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(int8_initializers) == n_linear


def test_per_token_survives_an_outlier_token():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    x = torch.randn(8, 64)
    x[0] *= 200  # one outlier token, as in LLM activations
    errors = {}
    for per_token in (True, False):
        q = DynamicInt8Linear.from_weight(linear.weight, linear.bias, per_token=per_token)
        with torch.no_grad():
            errors[per_token] = rel_error([q(x)[1:]], [linear(x)[1:]])
    assert errors[True] < 0.02 < errors[False]


def test_bad_activation_mode_is_refused():
    with pytest.raises(presso.ConfigError, match="activations"):
        presso.make_pass("quantize_dynamic_int8", activations="per_channel")


def test_skip_keeps_lm_head_float():
    model, ids = build("llama")
    compiled = presso.compile(model, [presso.make_pass("quantize_dynamic_int8", skip=("lm_head",))], example_inputs=ids)
    assert isinstance(compiled.module.lm_head, torch.nn.Linear)
    assert isinstance(compiled.module.model.layers[0].mlp.down_proj, DynamicInt8Linear)
    assert compiled.report["passes"][0]["stats"]["skipped"] == ["lm_head"]


@pytest.mark.parametrize("per_token", [True, False])
def test_reference_op_against_float_linear(per_token):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    q = DynamicInt8Linear.from_weight(linear.weight, linear.bias, per_token=per_token)
    x = torch.randn(3, 5, 96)
    with torch.no_grad():
        assert rel_error([q(x)], [linear(x)]) < 0.02
        assert max_abs_error([q(torch.zeros(2, 96))], [linear.bias.expand(2, -1)]) < 1e-6  # zero input: exact


def test_size_on_disk_shrinks(tmp_path):
    from models import small_llama

    model = small_llama()
    ids = torch.randint(3, 2048, (1, 16))
    float_size = sum(p.numel() * p.element_size() for p in model.parameters())  # a float file is at least this
    int8 = presso.compile(model, ["quantize_dynamic_int8"], example_inputs=ids)
    int8_size = int8.export(tmp_path / "q", kv_cache=False).stat().st_size
    assert int8_size < 0.4 * float_size
    assert int8.report["bytes_on_disk"] == int8_size
