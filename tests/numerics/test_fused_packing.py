"""q/k/v and gate/up packed into one matmul: exactly the parts' outputs side by side, for every
quantized format, and left apart where the parts differ."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from presso.runtime.fused.packing import pack_linears
from presso.runtime.int8 import DynamicInt8Linear
from presso.runtime.nbits import WeightOnlyLinear
from presso.runtime.qdq import ActivationQuant, StaticInt8Linear
from presso.runtime.quant import WeightFormat

WIDTHS = (64, 32, 32)  # q, k, v of a grouped-query layer


def _weights(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 96, generator=gen) for n in WIDTHS]


def _int4(fmt: WeightFormat):
    return lambda w: WeightOnlyLinear.quantize(w, None, fmt)


MAKERS = {
    "int4 symmetric g32": _int4(WeightFormat(4, 32, True)),
    "int4 asymmetric g64, float16 scales": _int4(WeightFormat(4, 64, False, scale_bits=16)),
    "int4 g32, int8 scale codes": _int4(WeightFormat(4, 32, True, scale_bits=8)),
    "int8 per channel": _int4(WeightFormat(8, -1, True)),
    "int8 dynamic per token": lambda w: DynamicInt8Linear.from_weight(w, torch.randn(w.shape[0])),
    "int8 dynamic per tensor": lambda w: DynamicInt8Linear.from_weight(w, None, per_token=False),
    "int8 static": lambda w: StaticInt8Linear(w, None, ActivationQuant(0.02, 3, symmetric=False)),
}


@pytest.mark.parametrize("kind", MAKERS)
def test_packed_output_is_the_parts_side_by_side(kind):
    parts = [MAKERS[kind](w) for w in _weights()]
    packed = pack_linears(parts)
    assert packed is not None and packed.out_features == sum(WIDTHS)
    x = torch.randn(2, 5, 96, generator=torch.Generator().manual_seed(1))
    want = torch.cat([p(x) for p in parts], dim=-1)
    torch.testing.assert_close(packed(x), want, rtol=0, atol=1e-6)
    assert all(p.out_features == n for p, n in zip(parts, WIDTHS))  # the parts are left as they were


def test_parts_that_differ_are_not_packed():
    w = _weights()
    int4, other_group = _int4(WeightFormat(4, 32)), _int4(WeightFormat(4, 64))
    assert pack_linears([int4(w[0]), int4(w[1]), other_group(w[2])]) is None  # other block size
    assert pack_linears([int4(w[0]), MAKERS["int8 dynamic per token"](w[1])]) is None  # other kind
    float_parts = [nn.Linear(96, n) for n in WIDTHS]
    assert pack_linears(float_parts) is None  # float weights would be held twice
    static = [StaticInt8Linear(t, None, ActivationQuant(0.02 * (i + 1), 3, symmetric=False)) for i, t in enumerate(w)]
    assert pack_linears(static) is None  # each part quantizes its input with its own scale
    tied = int4(w[0])
    tied.tied = True
    assert pack_linears([tied, int4(w[1])]) is None
