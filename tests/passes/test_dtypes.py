"""Every pass on bfloat16 and float16 models: it compiles, keeps the model's dtype, and stays
near the float32 result of the same model.

One pipeline per model and dtype covers the structural passes (heads, pruning, low rank) and
one compile per quantizer, so the matrix stays a few seconds per cell.
"""
from __future__ import annotations

import pytest
import torch

import presso
from presso.numerics import non_finite, rel_error
from tests.models import VOCAB, _hf, fast_only

HALF = [torch.bfloat16, torch.float16]
CAUSAL = ["llama", "qwen2", "phi3", "falcon", "gpt2", "opt"]
IDS = torch.randint(3, VOCAB - 1, (1, 8), generator=torch.Generator().manual_seed(0))
CALIBRATION = [torch.randint(3, VOCAB - 1, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]

STRUCTURAL = [("share_attention_heads", {}), ("prune_structured", {"ratio": 0.25}),
              ("split_low_rank", {"ratio": 0.3, "method": "whiten"})]
QUANTIZERS = {
    "weights-gptq": [("quantize_weights", {"method": "awq+gptq", "group_size": 16, "embeddings": "int8"})],
    "dynamic": [("quantize_dynamic_int8", {})],
    "static": [("smooth_quant", {}), ("quantize_static_int8", {})],
}
# llama also takes the residual rotation (the others' norms or layouts do not allow it)
ROTATED = [("rotate_residual", {}), ("quantize_weights", {})]


def _compile(model, steps, backend="torch"):
    passes = [presso.make_pass(name, **opts) for name, opts in steps]
    return presso.compile(model, passes, example_inputs=IDS, calibration=CALIBRATION, backend=backend)


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _check(arch: str, dtype: torch.dtype, steps, tolerance: float | None = None):
    model = _hf(arch).to(dtype).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compiled = _compile(model, steps)
    got = _logits(compiled)
    assert got.dtype == dtype, f"{arch}: outputs in {got.dtype}, the model is {dtype}"
    floats = {t.dtype for t in compiled.graph.module.parameters() if t.is_floating_point()}
    assert floats <= {dtype}, f"{arch}: the compiled model holds {floats}"
    assert not non_finite([got])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the caller's model changed"
    if tolerance is not None:  # the same pipeline on the float32 model: half precision costs rounding only
        reference = _logits(_compile(_hf(arch).eval(), steps))
        err = rel_error([got.float()], [reference])
        assert err < tolerance, f"{arch} {dtype}: {err:.3g} from the float32 result"


FAMILIES = fast_only(CAUSAL, ("llama",))  # every family and half dtype in make test-all (CI)
BF16_FAST = fast_only(HALF, (torch.bfloat16,))


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("arch", FAMILIES)
def test_structural_passes_keep_dtype(arch, dtype):
    _check(arch, dtype, STRUCTURAL, tolerance=0.1 if arch == "llama" else None)


@pytest.mark.slow
def test_opt_shared_pruned_split_traces():
    """Pruning OPT after its kv heads were shared keeps the shared-kv forward's own repeat (the
    attention wrapper must not repeat the heads again)."""
    compiled = _compile(_hf("opt").eval(), STRUCTURAL)
    assert not non_finite([_logits(compiled)])


@pytest.mark.parametrize("dtype", BF16_FAST, ids=str)
@pytest.mark.parametrize("family", sorted(QUANTIZERS))
def test_quantizers_keep_dtype(family, dtype):
    _check("llama", dtype, QUANTIZERS[family], tolerance=0.1)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen2", "phi3", "falcon", "gpt2", "opt"])
def test_weight_quantization_on_every_family_bf16(arch):
    _check(arch, torch.bfloat16, QUANTIZERS["weights-gptq"])


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_rotation_keeps_dtype(dtype):
    _check("llama", dtype, ROTATED, tolerance=0.1)


def test_bert_half_precision():
    model = _hf("bert").to(torch.bfloat16).eval()
    compiled = presso.compile(model, ["quantize_dynamic_int8"], example_inputs=IDS)
    assert compiled(IDS).last_hidden_state.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", BF16_FAST, ids=str)
def test_half_model_lowers_to_float32_onnx(dtype, tmp_path):
    """ONNX Runtime's CPU kernels are float32: the file computes in float32, is checked against a
    float32 view of the compiled model, and the backend returns the model's dtype."""
    model = _hf("llama").to(dtype).eval()
    compiled = _compile(model, [("quantize_weights", {"group_size": 16})], backend="onnxruntime")
    assert compiled(IDS).logits.dtype == dtype
    compiled.export(tmp_path / "out")
    check = compiled.report["export_check"]  # int8 activations in MatMulNBits: within their noise floor
    assert check["rel_error"] <= check["tolerance"] and check["rel_error"] < 0.05
    precision = compiled.report["precision"]
    assert precision["model_dtype"] == str(dtype).replace("torch.", "")
    assert precision["lowered_dtype"] == "float32"
    assert 0 < precision["rel_error_vs_model"] < 0.05
    # the compiled model itself was not cast by the export
    assert {t.dtype for t in compiled.graph.module.parameters()} == {dtype}
