"""backend="triton": a clear error without CUDA; on a GPU, quantized linears run through the kernels."""
import pytest
import torch

import presso
from presso.errors import ConfigError

from models import build


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
