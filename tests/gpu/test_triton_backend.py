"""backend="triton": a clear error without CUDA; on a GPU, quantized linears run through the kernels."""
import pytest
import torch
from models import build

import presso
from presso.errors import ConfigError


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cpu_only_machine_gets_a_clear_error():
    model, example = build("llama")
    with pytest.raises(ConfigError, match="backend='triton' needs a CUDA GPU") as info:
        presso.compile(model, [presso.make_pass("quantize_weights", bits=4)], example_inputs=example, backend="triton")
    assert "onnxruntime" in info.value.hint


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("passes", [[("quantize_weights", dict(bits=4, group_size=32))],
                                    [("quantize_weights", dict(bits=8, group_size=-1))],
                                    [("quantize_dynamic_int8", {})]])
def test_quantized_linears_run_through_the_kernels(passes):
    pytest.importorskip("triton")
    model, example = build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compiled = presso.compile(model, [presso.make_pass(n, **o) for n, o in passes], example_inputs=example,
                              backend="triton")
    assert compiled.report["backend_rel_error"] < 1e-2
    assert compiled._run.swapped and all("Triton" in v for v in compiled._run.swapped.values())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("pass_name, options", [("quantize_weights", dict(bits=4, group_size=32)),
                                                ("quantize_dynamic_int8", {})])
def test_gated_mlps_run_as_two_launches(pass_name, options):
    """Llama's MLPs become one packed gate/up linear and a down projection that gates its input;
    bf16 model, outputs within the backend's check, the caller's model untouched."""
    pytest.importorskip("triton")
    model, example = build("llama")
    model = model.to(torch.bfloat16)
    compiled = presso.compile(model, [presso.make_pass(pass_name, **options)], example_inputs=example,
                              backend="triton")
    mlps = [path for path, kind in compiled._run.swapped.items() if kind == "TritonGatedMLP"]
    assert mlps == [f"model.layers.{i}.mlp" for i in range(model.config.num_hidden_layers)]
    folded = [path for path, kind in compiled._run.swapped.items() if kind == "folded into TritonGatedMLP"]
    # a W8A8 gate/up normalizes as it quantizes: the layer's post-attention norm is its input's
    assert folded == ([f"{path[:-4]}.post_attention_layernorm" for path in mlps] if pass_name == "quantize_dynamic_int8"
                      else [])
    assert compiled.report["backend_rel_error"] < 2e-2
    with torch.no_grad():
        got = compiled(example)
    assert torch.isfinite(got.logits if hasattr(got, "logits") else got[0]).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["int4", "w8a8"])
def test_triton_linears_compile_without_graph_breaks(kind):
    """The kernels are custom ops: ``torch.compile(fullgraph=True)`` traces through them and agrees with eager."""
    pytest.importorskip("triton")
    from presso.runtime.int8 import DynamicInt8Linear
    from presso.runtime.nbits import WeightOnlyLinear
    from presso.runtime.quant import WeightFormat
    from presso.runtime.triton.modules import TritonW8A8Linear, TritonWeightOnlyLinear

    torch.manual_seed(0)
    w = torch.randn(384, 256) * 0.05
    linear = (TritonWeightOnlyLinear(WeightOnlyLinear.quantize(w, None, WeightFormat(4, 64, True))) if kind == "int4"
              else TritonW8A8Linear(DynamicInt8Linear.from_weight(w, None, per_token=True))).cuda()
    block = torch.nn.Sequential(torch.nn.RMSNorm(256, device="cuda", dtype=torch.bfloat16), linear, torch.nn.SiLU())
    x = torch.randn(3, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        eager = block(x)
        compiled = torch.compile(block, fullgraph=True, dynamic=False)(x)
    assert torch.isfinite(compiled).all()
    assert (compiled.float() - eager.float()).norm() / eager.float().norm() < 1e-2

    def prenorm_block(delta, h):  # a pre-norm block's add and norm inside the linear's launches
        return linear(delta, norm=block[0], residual=h)

    for rows in (1, 3):
        delta, h = torch.randn(2, rows, 256, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            y, h_new = torch.compile(prenorm_block, fullgraph=True, dynamic=False)(delta, h)
            ref = linear(block[0](delta + h))
        assert torch.equal(h_new, delta + h)
        assert torch.isfinite(y).all() and (y.float() - ref.float()).norm() / ref.float().norm() < 1e-2, rows
