"""The swapped-operand tensor-core kernel (``out.T = W @ x.T``) against its float64 reference (CUDA only)."""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
triton = pytest.importorskip("triton")

from presso.runtime.nbits import PackedWeight  # noqa: E402
from presso.runtime.quant import WeightFormat, quantize_weight  # noqa: E402
from presso.runtime.triton import tuning, weight_only  # noqa: E402
from presso.runtime.triton.gemm_swapped import gemm_swapped  # noqa: E402
from presso.runtime.triton.reference import weight_only_reference  # noqa: E402

TOLERANCE = 1e-2  # 16-bit operands
SHAPES = [(1536, 576), (576, 1536), (1000, 576), (200, 328), (48, 1000)]  # (N, K): odd sizes on purpose
FORMATS = [(4, 128, True), (4, 64, False), (4, 32, True), (8, -1, True), (8, 128, False)]


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(got).all()
    return float((got.double().cpu() - ref).norm() / ref.norm())


@pytest.mark.parametrize("n, k", SHAPES)
@pytest.mark.parametrize("bits, group, symmetric", FORMATS)
def test_swapped_kernel_matches_reference(n, k, bits, group, symmetric):
    """Forced tiles (split K, biased codes and K-order unpacking where they apply, ragged rows, a
    prefill tile) and the autotuned choice, from a few rows to a prefill."""
    dtype = torch.bfloat16 if (n + bits) % 2 else torch.float16
    packed = PackedWeight(quantize_weight(torch.randn(n, k), WeightFormat(bits, group, symmetric))).cuda()
    codes, scales, zeros = weight_only.prepare(packed.packed, packed.scales, packed.zeros, bits, dtype)
    bias = torch.randn(n, device="cuda")
    block_k = min(64, packed.block_size)  # a tile stays inside one block
    biased = (0, 1) if bits == 4 else (0,)
    unpack = (0, 1) if bits == 4 else (0,)
    for m in (3, 16, 40, 300):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        ref = weight_only_reference(x, packed.packed, packed.scales, packed.zeros, k, bits, bias)
        configs = [dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=block_k, SPLIT_K=3, BIASED=b, UNPACK=u)
                   for b in biased for u in unpack]
        configs += [dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=block_k, SPLIT_K=1, BIASED=biased[-1], UNPACK=unpack[-1],
                         num_stages=4),
                    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=block_k, SPLIT_K=1, BIASED=biased[-1], UNPACK=unpack[-1],
                         num_warps=8), None]  # a prefill tile, then the autotuned choice
        for config in configs:
            got = gemm_swapped(x, codes, scales, zeros, k, bits, bias.to(dtype), config=config)
            assert got.shape == (m, n) and got.dtype == dtype
            assert rel(got, ref) < TOLERANCE, (m, config)
    if bits == 8:
        with pytest.raises(ValueError, match="int4 with 16-bit activations"):
            gemm_swapped(x, codes, scales, zeros, k, bits, config=dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64,
                                                                       SPLIT_K=1, BIASED=1))


@pytest.mark.parametrize("bits, group, symmetric", [(4, 128, True), (4, 64, False), (8, -1, True)])
def test_swapped_kernel_gates_its_input(bits, group, symmetric):
    """A down projection fed ``[gate | up]``: ``silu(gate) * up`` computed as the kernel loads it."""
    n, k = 576, 1536
    packed = PackedWeight(quantize_weight(torch.randn(n, k), WeightFormat(bits, group, symmetric))).cuda()
    operands = weight_only.prepare(packed.packed, packed.scales, packed.zeros, bits, torch.bfloat16)
    for m in (5, 40):
        both = torch.randn(m, 2 * k, device="cuda", dtype=torch.bfloat16) * 2
        ref = weight_only_reference(tuning.silu_gate(both), packed.packed, packed.scales, packed.zeros, k, bits)
        for config in (dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, SPLIT_K=2, BIASED=int(bits == 4)),
                       dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, SPLIT_K=1, UNPACK=int(bits == 4)), None):
            got = gemm_swapped(both, *operands, k, bits, gated=True, config=config)
            assert got.shape == (m, n) and rel(got, ref) < TOLERANCE, (m, config)


def test_biased_codes_keep_large_activations_accurate():
    """``BIAS + c`` products minus ``(BIAS + 8) * sum(x)``: activations in the thousands stay within tolerance."""
    n, k = 1536, 576
    packed = PackedWeight(quantize_weight(torch.randn(n, k), WeightFormat(4, 64, True))).cuda()
    for dtype in (torch.bfloat16, torch.float16):
        operands = weight_only.prepare(packed.packed, packed.scales, packed.zeros, 4, dtype)
        x = torch.randn(16, k, device="cuda", dtype=dtype) * (3000 if dtype == torch.bfloat16 else 30)
        ref = weight_only_reference(x, packed.packed, packed.scales, packed.zeros, k, 4)
        got = gemm_swapped(x, *operands, k, 4, config=dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, SPLIT_K=1, BIASED=1))
        assert rel(got, ref) < TOLERANCE, dtype


@pytest.mark.parametrize("bits, group, symmetric", [(4, 128, True), (8, -1, False)])
def test_the_dispatch_routes_rows_to_the_swapped_kernel_where_told(monkeypatch, bits, group, symmetric):
    """With a route (``PRESSO_SWAPPED_ROWS``), the word-layout dispatch sends those rows to
    gemm_swapped (plain and gated) and the rows above to gemm_words, each matching the reference."""
    from presso.runtime.triton import gemv_words

    n, k = 576, 1536
    packed = PackedWeight(quantize_weight(torch.randn(n, k), WeightFormat(bits, group, symmetric))).cuda()
    operands = weight_only.prepare(packed.packed, packed.scales, packed.zeros, bits, torch.bfloat16)
    words = gemv_words.prepare_words(*operands)
    monkeypatch.setattr(weight_only, "SWAPPED_ROWS", {bits: 16})
    called = []
    for name in ("gemm_swapped", "gemm_words"):
        real = getattr(weight_only, name)
        monkeypatch.setattr(weight_only, name, lambda *a, _real=real, _name=name, **kw: called.append(_name) or
                            _real(*a, **kw))
    for m, gated in ((4, False), (16, True), (17, False)):
        x = torch.randn(m, (1 + gated) * k, device="cuda", dtype=torch.bfloat16)
        ref = weight_only_reference(tuning.silu_gate(x) if gated else x, packed.packed, packed.scales,
                                    packed.zeros, k, bits)
        got = weight_only.weight_only_matmul(x, *operands, k, bits, words=words, gated=gated)
        assert rel(got, ref) < TOLERANCE, m
    assert called == ["gemm_swapped", "gemm_swapped", "gemm_words"]
