"""presso's torch reference of ``MatMulNBits`` against ONNX Runtime's kernel at
``accuracy_level=4`` (int8 activations per block of k): the export check of every weight-only
model rests on this agreement."""
from __future__ import annotations

import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, numpy_helper
from onnx import helper as oh

from presso.runtime.nbits import PackedWeight, accuracy_level, matmul_nbits
from presso.runtime.quant import WeightFormat, quantize_weight


def _kernel(w: PackedWeight, x: torch.Tensor) -> torch.Tensor:
    inputs = ["A", "B", "S"] + (["Z"] if w.zeros is not None else [])
    arrays = [w.packed, w.group_scales().float().reshape(-1)] + ([w.zeros.reshape(-1)] if w.zeros is not None else [])
    node = oh.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=w.in_features, N=w.out_features,
                        bits=w.fmt.bits, block_size=w.block_size, accuracy_level=accuracy_level(w.fmt.bits))
    graph = oh.make_graph([node], "g", [oh.make_tensor_value_info("A", TensorProto.FLOAT, list(x.shape))],
                          [oh.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(a.numpy(), n) for n, a in zip(inputs[1:], arrays)])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18), oh.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"A": x.numpy()})[0])


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [16, 32, 128])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("rows", [1, 16])
def test_reference_matches_onnx_runtime(bits, group, symmetric, rows):
    gen = torch.Generator().manual_seed(bits * group + rows)
    k, n = 576, 96  # k not a multiple of 128: the last block is padded
    w = PackedWeight(quantize_weight(torch.randn(n, k, generator=gen), WeightFormat(bits, group, symmetric)))
    x = torch.randn(1, rows, k, generator=gen)
    want = matmul_nbits(x, w.packed, w.group_scales(), w.zeros, k, n, bits, w.block_size)
    got = _kernel(w, x)
    assert ((got - want).norm() / want.norm()).item() < 1e-5
