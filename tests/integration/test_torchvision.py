"""Real torchvision architectures (random weights), pruned, exported and run in ONNX Runtime.

Optional: needs the ``vision`` extra (torch 2.14.1 + torchvision 0.29.1); PyPI's torchvision
does not import beside the CPU torch 2.13.0 of the default install, so this skips there.
The same patterns are covered by small local models in tests/numerics/test_prune_structured.py.
"""
import pytest
import torch

import presso
from presso.numerics import rel_error
from presso.testing import call


def _torchvision():
    try:
        import torchvision
    except Exception as exc:  # noqa: BLE001 - an ImportError or a failed operator registration
        pytest.skip(f"torchvision is not usable here ({type(exc).__name__}); install presso[vision]")
    return torchvision


CASES = [("resnet18", ("channels",), 64), ("mobilenet_v3_small", ("channels",), 64),
         ("efficientnet_b0", ("channels",), 64), ("convnext_tiny", ("channels", "hidden", "mlp"), 64),
         ("densenet121", ("channels",), 64), ("regnet_y_400mf", ("channels",), 64),
         ("vit_b_16", ("mlp",), 224)]


@pytest.mark.integration
@pytest.mark.parametrize("arch, target, size", CASES)
def test_torchvision_model_prunes_exports_and_matches(arch, target, size):
    tv = _torchvision()
    torch.manual_seed(0)
    model = getattr(tv.models, arch)(weights=None).eval()
    x = torch.randn(1, 3, size, size)
    compiled = presso.compile(model, [presso.make_pass("prune_structured", target=target, ratio=0.3)],
                              example_inputs=x, backend="onnxruntime")
    assert compiled.report["params_after"] < compiled.report["params_before"]
    reference = presso.compile(model, [presso.make_pass("prune_structured", target=target, ratio=0.3)],
                               example_inputs=x)
    other = torch.randn(2, 3, size, size)
    assert rel_error(call(compiled, other), call(reference, other)) < 1e-4
