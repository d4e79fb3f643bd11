"""Quantization arithmetic, GPTQ and AWQ against float references."""
import pytest
import torch

from presso.passes.quantization import awq
from presso.passes.quantization.gptq import gptq_quantize, group_level, refit_scales
from presso.passes.quantization.observers import RangeObserver
from presso.runtime.nbits import PackedWeight, WeightOnlyLinear, _round_blocks_int8, dequantize_packed
from presso.runtime.qdq import quantize_dequantize
from presso.runtime.quant import (
    WeightFormat,
    pack_codes,
    quantize_activation_params,
    quantize_weight,
    scale_codes,
    unpack_codes,
)

FORMATS = [WeightFormat(4, 32, True), WeightFormat(4, 64, False), WeightFormat(4, 128, True),
           WeightFormat(4, -1, False), WeightFormat(8, 64, True), WeightFormat(8, -1, False)]


def correlated_inputs(k: int, rows: int = 2048, seed: int = 0) -> torch.Tensor:
    """Inputs with unequal, correlated channels, as real activations have."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    return (torch.randn(rows, k, generator=g) * torch.logspace(-1, 1, k)) @ mix


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("k", [96, 576, 200])  # 576 and 200 are not multiples of 128 (nor 200 of 64)
def test_rounding_error_is_within_half_a_step(fmt, k):
    torch.manual_seed(0)
    w = torch.randn(24, k)
    q = quantize_weight(w, fmt)
    deq = q.dequantize()
    assert deq.shape == w.shape
    group = fmt.group(k)
    step = q.scales.abs().repeat_interleave(q.block_size, dim=1)[:, :k]
    err = (deq - w).abs()
    # asymmetric: half a step; symmetric: the largest magnitude maps exactly, the far end may clamp one step
    bound = step * (0.5 if not fmt.symmetric else 1.0) + 1e-6
    assert torch.all(err <= bound)
    assert int(q.codes.max()) <= fmt.levels - 1 and int(q.codes.min()) >= 0
    if group < k:
        assert q.scales.shape[1] == -(-k // group)


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_unpack_round_trip(bits):
    codes = torch.randint(0, 2 ** bits, (5, 64), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape[1] == 64 * bits // 8
    assert torch.equal(unpack_codes(packed, bits, 64), codes)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_packed_linear_matches_dequantized_float_linear(fmt):
    torch.manual_seed(0)
    linear = torch.nn.Linear(576, 40)
    q = quantize_weight(linear.weight.detach(), fmt)
    module = WeightOnlyLinear(PackedWeight(q), linear.bias)
    x = torch.randn(3, 7, 576)
    x = _round_blocks_int8(x, q.block_size)  # int8 activations per block, as ONNX Runtime's kernels
    expected = torch.nn.functional.linear(x, q.dequantize(), linear.bias)
    assert torch.allclose(module(x), expected, atol=1e-5)
    w = module.weight_q
    assert torch.equal(dequantize_packed(w.packed, w.scales, w.zeros, 576, fmt.bits), q.dequantize())
    assert (w.zeros is None) == fmt.symmetric


def test_quantize_dequantize_matches_onnx_arithmetic():
    x = torch.tensor([-1.0, -0.05, 0.0, 0.025, 0.075, 3.0])
    scale, zp = quantize_activation_params(-0.5, 1.0, symmetric=False)
    got = quantize_dequantize(x, torch.tensor(scale), torch.tensor(zp, dtype=torch.uint8))
    q = torch.clamp(torch.round(x / scale) + zp, 0, 255)  # ONNX QuantizeLinear: round half to even, saturate
    assert torch.allclose(got, (q - zp) * scale)
    assert got[2] == 0.0  # zero is exact
    scale, zp = quantize_activation_params(-0.5, 1.0, symmetric=True)
    assert zp == 0 and scale == pytest.approx(1.0 / 127)


def test_gptq_beats_round_to_nearest_on_output_error():
    torch.manual_seed(0)
    x = correlated_inputs(192)
    h = x.t() @ x / x.shape[0]
    w = torch.randn(64, 192)
    fmt = WeightFormat(4, 64, True)
    rtn_err = awq.output_error(w, quantize_weight(w, fmt).dequantize(), h)
    for act_order in (False, True):
        q = gptq_quantize(w, h, fmt, act_order=act_order)
        gptq_err = awq.output_error(w, q.dequantize(), h)
        assert gptq_err < 0.8 * rtn_err
        assert q.codes.max() < 16 and q.scales.shape == (64, 3)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_refit_scales_keeps_codes_and_lowers_output_error(fmt):
    torch.manual_seed(0)
    x = correlated_inputs(200)  # ragged last group for every group size
    h = x.t() @ x / x.shape[0]
    w = torch.randn(32, 200)
    for q in (quantize_weight(w, fmt), gptq_quantize(w, h, fmt)):
        refit = refit_scales(w, q, h)
        assert torch.equal(refit.codes, q.codes) and refit.scales.shape == q.scales.shape
        before, after = awq.output_error(w, q.dequantize(), h), awq.output_error(w, refit.dequantize(), h)
        assert after < 0.99 * before  # least squares in the scales; the old ones were one candidate
        again = gptq_quantize(w, h, fmt, fixed=group_level(refit))  # re-rounding to the refitted scales
        assert torch.allclose(group_level(again)[0], group_level(refit)[0])


def test_float16_scales_are_rounded_where_chosen_and_stored_as_float16():
    torch.manual_seed(0)
    w = torch.randn(48, 200)
    fmt16 = WeightFormat(4, 64, True, scale_bits=16)
    q = quantize_weight(w, fmt16)
    assert torch.equal(q.scales, q.scales.half().float())
    packed = PackedWeight(q)
    assert packed.scales.dtype == torch.float16
    assert torch.equal(packed.dequantize(), q.dequantize())
    assert fmt16.bytes_for(48, 200) < WeightFormat(4, 64, True).bytes_for(48, 200)
    x = correlated_inputs(200)
    h = x.t() @ x / x.shape[0]
    refit = refit_scales(w, gptq_quantize(w, h, fmt16), h)
    assert torch.equal(refit.scales, refit.scales.half().float())


def test_gptq_handles_dead_inputs_and_ragged_groups():
    torch.manual_seed(0)
    x = correlated_inputs(200)
    x[:, 5] = 0  # a channel that is never active: singular Hessian
    h = x.t() @ x / x.shape[0]
    q = gptq_quantize(torch.randn(16, 200), h, WeightFormat(4, 128, False))
    assert torch.isfinite(q.dequantize()).all() and q.dequantize()[:, 5].abs().max() == 0


def test_awq_scales_and_clipping_never_lose_to_rtn():
    torch.manual_seed(0)
    x = correlated_inputs(128)
    x[:, :4] *= 30  # salient channels
    h = x.t() @ x / x.shape[0]
    w = torch.randn(32, 128)
    fmt = WeightFormat(4, 32, True)
    rtn_err = awq.output_error(w, awq.rtn(w, fmt), h)
    s, alpha = awq.search_scales([w], h, x.abs().mean(0), fmt)
    scaled_err = awq.output_error(w, awq.rtn(w * s, fmt) / s, h)
    assert scaled_err <= rtn_err and alpha > 0
    clipped = awq.clip_quantize(w, h, fmt).dequantize()
    assert awq.output_error(w, clipped, h) <= rtn_err


def test_observers_narrow_the_range_on_outliers():
    torch.manual_seed(0)
    x = torch.randn(100_000)
    x[:3] = 500.0
    ranges = {}
    for kind in ("minmax", "percentile", "mse"):
        obs = RangeObserver(kind)
        obs.update(x)
        ranges[kind] = obs.range()
    assert ranges["minmax"][1] == 500.0
    assert ranges["percentile"][1] < 10
    laplace = torch.distributions.Laplace(0.0, 1.0).sample((100_000,))
    errors = {}
    for kind in ("minmax", "mse"):
        obs = RangeObserver(kind)
        obs.update(laplace)
        scale, zp = obs.params()
        deq = (torch.clamp(torch.round(laplace / scale) + zp, 0, 255) - zp) * scale
        errors[kind] = (obs.range()[1], float((deq - laplace).pow(2).mean()))
    assert errors["mse"][0] < errors["minmax"][0] and errors["mse"][1] < errors["minmax"][1]
    with pytest.raises(RuntimeError, match="no data"):
        RangeObserver().range()


def test_int8_scale_codes_round_once_and_halve_the_scale_bytes():
    torch.manual_seed(0)
    w = torch.randn(48, 200)
    fmt8 = WeightFormat(4, 64, True, scale_bits=8)
    q = quantize_weight(w, fmt8)
    codes, rows = scale_codes(q.scales)
    assert codes.dtype == torch.int8 and rows.dtype == torch.float16 and rows.shape == (48, 1)
    assert torch.equal(codes.float() * rows.float(), q.scales)  # chosen on the stored grid
    assert torch.equal(fmt8.round_scales(q.scales), q.scales)  # rounding again changes nothing
    assert codes.abs().amax(1).eq(127).all() and codes.ne(0).all()
    assert torch.equal(q.codes, quantize_weight(w, fmt8, q.scales, q.zeros).codes)
    packed = PackedWeight(q)
    assert packed.scales is None and packed.scale_codes.dtype == torch.int8
    assert torch.equal(packed.dequantize(), q.dequantize())
    assert packed.nbytes() == fmt8.bytes_for(48, 200) < WeightFormat(4, 64, True, scale_bits=16).bytes_for(48, 200)
    fp16 = quantize_weight(w, WeightFormat(4, 64, True, scale_bits=16)).dequantize()
    rel = lambda a: float((a - w).norm() / w.norm())  # noqa: E731
    assert rel(q.dequantize()) < 1.02 * rel(fp16)  # 8-bit scales cost under 2% of the int4 error
