"""Packed embedding tables in ONNX Runtime (``GatherBlockQuantized``, or unpacking in standard
ONNX for 4-bit zero points) against the torch reference, for every table format."""
from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest
import torch

from presso.plugins.registry import get_registry
from presso.runtime.nbits import PackedWeight, WeightOnlyEmbedding
from presso.runtime.onnx_export import write_program
from presso.runtime.quant import WeightFormat, quantize_weight


class _Lookup(torch.nn.Module):
    def __init__(self, table: PackedWeight):
        super().__init__()
        self.embedding = WeightOnlyEmbedding(table)

    def forward(self, ids):
        return self.embedding(ids)


@pytest.mark.parametrize("fmt,k", [
    (WeightFormat(4, 32, True), 576), (WeightFormat(4, 64, True, scale_bits=16), 100),
    (WeightFormat(4, 32, True, scale_bits=8), 576), (WeightFormat(8, 64, False), 576),
    (WeightFormat(8, -1, True), 576), (WeightFormat(4, 32, False), 100),
], ids=lambda v: f"{v.bits}b-g{v.group_size}-{'sym' if v.symmetric else 'asym'}-s{v.scale_bits}"
    if isinstance(v, WeightFormat) else f"k{v}")
def test_packed_table_lookup_matches_the_reference(fmt, k, tmp_path):
    table = PackedWeight(quantize_weight(torch.randn(40, k, generator=torch.Generator().manual_seed(0)), fmt))
    module, ids = _Lookup(table).eval(), torch.tensor([[3, 7, 39], [0, 1, 2]])
    auto = torch.export.Dim.AUTO
    program = torch.export.export(module, (ids,), dynamic_shapes=({0: auto, 1: auto},))
    file = tmp_path / "m.onnx"
    write_program(program, ["ids"], ["rows"], file, get_registry().onnx_lowerings, model_name="lookup")
    ops = {n.op_type for n in onnx.load(str(file)).graph.node}
    assert ("GatherBlockQuantized" in ops) == (fmt.bits == 8 or fmt.symmetric)
    session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    other = torch.tensor([[5, 5, 5, 9]])  # another shape than traced
    for x in (ids, other):
        got = torch.from_numpy(session.run(None, {"ids": x.numpy()})[0])
        torch.testing.assert_close(got, module(x), rtol=0, atol=1e-6)
