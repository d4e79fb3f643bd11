"""Triton kernels against their float64 torch references, on random data and odd shapes (CUDA only)."""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
triton = pytest.importorskip("triton")

from presso.runtime.int8 import DynamicInt8Linear  # noqa: E402
from presso.runtime.nbits import PackedWeight  # noqa: E402
from presso.runtime.quant import WeightFormat, quantize_weight  # noqa: E402
from presso.runtime.triton import gemm_words, gemv_words, w8a8, weight_only  # noqa: E402
from presso.runtime.triton.reference import w8a8_reference, weight_only_reference  # noqa: E402

TOLERANCE = 1e-2  # bf16 operands
SHAPES = [(1536, 576), (576, 1536), (1000, 576), (200, 328), (48, 1000)]  # (N, K): odd sizes on purpose
FORMATS = [(4, 128, True), (4, 64, False), (4, 32, True), (8, -1, True), (8, 128, False)]
FORCED = [None, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=1, num_warps=4),
          dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, SPLIT_K=4, num_warps=4),
          dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, SPLIT_K=1, num_warps=4)]


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(got).all()
    return float((got.double().cpu() - ref).norm() / ref.norm())


def _packed(n, k, bits, group, symmetric, dtype):
    packed = PackedWeight(quantize_weight(torch.randn(n, k), WeightFormat(bits, group, symmetric))).cuda()
    return packed, weight_only.prepare(packed.packed, packed.scales, packed.zeros, bits, dtype)


@pytest.mark.parametrize("n, k", SHAPES)
@pytest.mark.parametrize("bits, group, symmetric", FORMATS)
def test_weight_only_matches_reference(n, k, bits, group, symmetric):
    """Fixed tile configurations (every path: one row, a few rows, tensor cores, split K), fresh data each."""
    dtype = torch.bfloat16 if (n + bits) % 2 else torch.float16
    packed, (codes, scales, zeros) = _packed(n, k, bits, group, symmetric, dtype)
    bias = torch.randn(n, device="cuda")
    for m in (1, 5, 33):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        ref = weight_only_reference(x, packed.packed, packed.scales, packed.zeros, k, bits, bias)
        for config in FORCED[1:]:
            config = dict(config, BLOCK_K=min(config["BLOCK_K"], packed.block_size))  # a tile stays in one block
            got = weight_only.weight_only_matmul(x, codes, scales, zeros, k, bits, bias.to(dtype), config=config)
            assert got.shape == (m, n) and got.dtype == dtype
            assert rel(got, ref) < TOLERANCE, (m, config)


@pytest.mark.parametrize("n, k, bits, group, symmetric", [(4096, 4096, 4, 128, True), (1536, 576, 4, 64, False),
                                                          (576, 1536, 8, -1, True)])
def test_autotuned_weight_only_matches_reference(n, k, bits, group, symmetric):
    packed, (codes, scales, zeros) = _packed(n, k, bits, group, symmetric, torch.bfloat16)
    for m in (1, 4, 16):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        got = weight_only.weight_only_matmul(x, codes, scales, zeros, k, bits)
        assert rel(got, weight_only_reference(x, packed.packed, packed.scales, packed.zeros, k, bits)) < TOLERANCE


@pytest.mark.parametrize("n, k", SHAPES)
@pytest.mark.parametrize("bits, group, symmetric", FORMATS)
def test_word_gemv_matches_reference(n, k, bits, group, symmetric):
    """The batch-1 kernel on the word-transposed copy: forced tiles (ragged K, split K) and the autotuned one."""
    packed, operands = _packed(n, k, bits, group, symmetric, torch.bfloat16)
    words = gemv_words.prepare_words(*operands)
    bias = torch.randn(n, device="cuda")
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    ref = weight_only_reference(x, packed.packed, packed.scales, packed.zeros, k, bits, bias)
    words_per_group = words[0].shape[0] // words[1].shape[0]  # a tile must stay inside one block
    half2 = bits == 4 and symmetric
    configs = [dict(BLOCK_N=64, TILE_W=2, SPLIT_K=3, DEQUANT=0), dict(BLOCK_N=256, TILE_W=words_per_group, SPLIT_K=1),
               None] + [dict(BLOCK_N=128, TILE_W=2, SPLIT_K=5, DEQUANT=2)] * half2
    for config in configs:
        got = gemv_words.gemv_words(x, *words, k, bits, bias.bfloat16(), config=config)
        assert got.shape == (1, n) and got.dtype == torch.bfloat16
        assert rel(got, ref) < TOLERANCE, config
    if half2:  # activations far outside float16's comfortable range stay finite and accurate
        big = x * 3000
        got = gemv_words.gemv_words(big, *words, k, bits, config=dict(BLOCK_N=128, TILE_W=2, SPLIT_K=1, DEQUANT=2))
        assert torch.isfinite(got).all()
        assert rel(got, weight_only_reference(big, packed.packed, packed.scales, packed.zeros, k, bits)) < TOLERANCE
    else:
        with pytest.raises(ValueError, match="symmetric int4"):
            gemv_words.gemv_words(x, *words, k, bits, config=dict(BLOCK_N=64, TILE_W=2, SPLIT_K=1, DEQUANT=2))
    with pytest.raises(ValueError, match="TILE_W"):
        gemv_words.gemv_words(x, *words, k, bits, config=dict(BLOCK_N=64, TILE_W=2 * words_per_group, SPLIT_K=1))
    got = weight_only.weight_only_matmul(x, *operands, k, bits, bias.bfloat16(), words=words)
    assert rel(got, ref) < TOLERANCE


def test_split_k_keeps_at_most_32_splits_with_work():
    """Each split's partial sums are added into the bf16 output, one rounding per add: the pruning
    rules keep at most 32 splits that hold tiles, and at that count the error stays in bound."""
    from presso.runtime.triton import tuning

    for words in (72, 192, 384, 512, 1376):  # K = 576 ... 11008, int4 and int8
        for c in gemv_words._configs() + gemm_words._configs():
            if tuning.split_ok(words, c.kwargs["TILE_W"], c.kwargs["SPLIT_K"]):
                tiles = -(-words // c.kwargs["TILE_W"])
                assert -(-tiles // -(-tiles // c.kwargs["SPLIT_K"])) <= 32 and c.kwargs["SPLIT_K"] <= 2 * tiles
    n, k = 4096, 4096
    packed, operands = _packed(n, k, 4, 128, True, torch.bfloat16)
    words = gemv_words.prepare_words(*operands)
    for config in (dict(BLOCK_N=256, TILE_W=8, SPLIT_K=32, DEQUANT=1),
                   dict(BLOCK_N=512, TILE_W=16, SPLIT_K=32, DEQUANT=2)):
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        got = gemv_words.gemv_words(x, *words, k, 4, config=config)
        assert rel(got, weight_only_reference(x, packed.packed, packed.scales, None, k, 4)) < TOLERANCE, config


def test_pinned_configurations_are_launched_and_kept_by_the_rules(monkeypatch):
    """A shape with a pin runs its pinned configuration (correctly); every shipped pin is one the
    pruning rules would keep."""
    import json

    from presso.runtime.triton import pins, tuning

    asked = []

    def pinned_on(kernel, device, key):
        asked.append((kernel, key))
        return dict(BLOCK_N=64, TILE_W=2, SPLIT_K=3, DEQUANT=1, num_warps=4, num_stages=3) if kernel == "gemv_words" \
            else dict(BLOCK_M=16, BLOCK_N=64, TILE_W=16, SPLIT_K=2, PAIRS=1, UNPACK=0, num_warps=4, num_stages=3)

    monkeypatch.setattr(pins, "pinned_on", pinned_on)
    n, k = 1536, 576
    packed, operands = _packed(n, k, 4, 64, True, torch.bfloat16)
    words = gemv_words.prepare_words(*operands)
    for m, kernel in ((1, gemv_words.gemv_words), (16, gemm_words.gemm_words)):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = weight_only_reference(x, packed.packed, packed.scales, None, k, 4)
        assert rel(kernel(x, *words, k, 4), ref) < TOLERANCE
    assert asked == [("gemv_words", "1536x576 m1 int4 g64 sym bfloat16"),
                     ("gemm_words", "1536x576 m16 int4 g64 sym bfloat16")]
    for kernels in json.loads(pins.TUNED.read_text()).get("pinned", {}).values():
        for by_key in kernels.values():
            for key, c in by_key.items():
                n, k = map(int, key.split()[0].split("x"))
                bits, group = int(key.split()[2][3:]), int(key.split()[3][1:])
                words_per_group, words = group * bits // 32, -(-k // group) * group * bits // 32
                assert words_per_group % c["TILE_W"] == 0 and tuning.split_ok(words, c["TILE_W"], c["SPLIT_K"]), key


@pytest.mark.parametrize("pdl", ["0", "1"])
def test_word_gemv_in_a_cuda_graph(monkeypatch, pdl):
    """Replayed back to back in one graph (the decode setting), with and without dependent launch:
    each call's zeroing, loads and adds stay ordered against the calls around it."""
    monkeypatch.setenv("PRESSO_PDL", pdl)
    n, k = 1536, 576
    packed, operands = _packed(n, k, 4, 64, True, torch.bfloat16)
    words = gemv_words.prepare_words(*operands)
    xs = [torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    config = dict(BLOCK_N=128, TILE_W=4, SPLIT_K=3, DEQUANT=2)
    for x in xs:  # compile outside the capture
        gemv_words.gemv_words(x, *words, k, 4, config=config)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [gemv_words.gemv_words(x, *words, k, 4, config=config) for x in xs]
        chained = gemv_words.gemv_words(outs[0][:, :k] * 0.01, *words, k, 4, config=config)  # reads a result
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    for x, got in zip(xs, outs):
        assert rel(got, weight_only_reference(x, packed.packed, packed.scales, None, k, 4)) < TOLERANCE
    ref = weight_only_reference(outs[0][:, :k] * 0.01, packed.packed, packed.scales, None, k, 4)
    assert rel(chained, ref) < TOLERANCE


@pytest.mark.parametrize("pdl", ["0", "1"])
def test_residual_add_and_norm_run_in_the_batch_1_launches(monkeypatch, pdl):
    """``rms_norm(x + residual)`` as the input: the sum returned exactly as torch rounds it, the
    product within the bound, autotuned and forced, split or not, after a producer in one CUDA
    graph; more rows take the same arithmetic in torch."""
    import torch.nn.functional as F

    monkeypatch.setenv("PRESSO_PDL", pdl)
    n, k = 1536, 576
    packed, operands = _packed(n, k, 4, 64, True, torch.bfloat16)
    words = gemv_words.prepare_words(*operands)
    x, res = torch.randn(1, k, device="cuda", dtype=torch.bfloat16), 4 * torch.randn(1, k, device="cuda",
                                                                                     dtype=torch.bfloat16)
    norm_weight = (torch.rand(k, device="cuda") + 0.5).bfloat16()

    def reference(x, res):
        h = x if res is None else x + res
        return weight_only_reference(F.rms_norm(h, (k,), norm_weight, 1e-5), packed.packed, packed.scales, None,
                                     k, 4), h

    ref, h_ref = reference(x, res)
    for config in (None, dict(BLOCK_N=128, TILE_W=4, SPLIT_K=3, DEQUANT=2), dict(BLOCK_N=64, TILE_W=2, SPLIT_K=1,
                                                                                 DEQUANT=1)):
        y, h = gemv_words.gemv_words(x, *words, k, 4, config=config, norm_weight=norm_weight, eps=1e-5, residual=res)
        assert torch.equal(h, h_ref) and rel(y, ref) < TOLERANCE, config
        alone = gemv_words.gemv_words(x, *words, k, 4, config=config, norm_weight=norm_weight, eps=1e-5)
        assert rel(alone, reference(x, None)[0]) < TOLERANCE, config
    rows = torch.randn(3, k, device="cuda", dtype=torch.bfloat16)
    y, h = weight_only.weight_only_matmul(rows, *operands, k, 4, words=words, norm_weight=norm_weight, eps=1e-5,
                                          residual=res.expand(3, k))
    ref3, h3 = reference(rows, res.expand(3, k))
    assert torch.equal(h, h3) and rel(y, ref3) < TOLERANCE
    with pytest.raises(ValueError, match="only before a norm"):
        gemv_words.gemv_words(x, *words, k, 4, residual=res)
    config = dict(BLOCK_N=128, TILE_W=4, SPLIT_K=3, DEQUANT=2)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # the delta comes from the kernel just before
        delta = gemv_words.gemv_words(x, *words, k, 4, config=config)[:, :k] * 0.01
        y, h = gemv_words.gemv_words(delta, *words, k, 4, config=config, norm_weight=norm_weight, eps=1e-5,
                                     residual=res)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    ref, h_ref = reference(delta, res)
    assert torch.equal(h, h_ref) and rel(y, ref) < TOLERANCE


@pytest.mark.parametrize("n, k", SHAPES)
@pytest.mark.parametrize("bits, group, symmetric", FORMATS)
def test_word_gemm_matches_reference(n, k, bits, group, symmetric):
    """The tensor-core kernel on the word-transposed copy: forced tiles (split K, code pairs) and the autotuned one."""
    dtype = torch.bfloat16 if (n + bits) % 2 else torch.float16
    packed, operands = _packed(n, k, bits, group, symmetric, dtype)
    words = gemv_words.prepare_words(*operands)
    bias = torch.randn(n, device="cuda")
    pairs = (0, 1) if bits == 4 and symmetric else (0,)
    for m in (3, 16, 40):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        ref = weight_only_reference(x, packed.packed, packed.scales, packed.zeros, k, bits, bias)
        configs = [dict(BLOCK_M=16, BLOCK_N=64, TILE_W=16, SPLIT_K=3, PAIRS=p) for p in pairs]
        configs += [dict(BLOCK_M=64, BLOCK_N=32, TILE_W=16, SPLIT_K=1, PAIRS=pairs[-1]), None]
        configs += [dict(BLOCK_M=32, BLOCK_N=64, TILE_W=16, SPLIT_K=2, UNPACK=1),  # one product per tile
                    dict(BLOCK_M=16, BLOCK_N=128, TILE_W=8, SPLIT_K=1, UNPACK=1, num_stages=4)]
        for config in configs:
            got = gemm_words.gemm_words(x, *words, k, bits, bias.to(dtype), config=config)
            assert got.shape == (m, n) and got.dtype == dtype
            assert rel(got, ref) < TOLERANCE, (m, config)
        got = weight_only.weight_only_matmul(x, *operands, k, bits, bias.to(dtype), words=words)
        assert rel(got, ref) < TOLERANCE
    if pairs == (0,):
        with pytest.raises(ValueError, match="symmetric int4"):
            config = dict(BLOCK_M=16, BLOCK_N=64, TILE_W=16, SPLIT_K=1, PAIRS=1)
            gemm_words.gemm_words(x, *words, k, bits, config=config)


@pytest.mark.parametrize("n, k", SHAPES)
@pytest.mark.parametrize("bits, group, symmetric", FORMATS)
def test_dequantized_cublas_path_matches_reference(n, k, bits, group, symmetric):
    """Prefill-sized batches: the weight dequantized from the words (padded K, zero points, both
    half dtypes), then cuBLAS."""
    from presso.runtime.triton import dequant

    dtype = torch.bfloat16 if (n + bits) % 2 else torch.float16
    packed, operands = _packed(n, k, bits, group, symmetric, dtype)
    words = gemv_words.prepare_words(*operands)
    exact = gemv_words.prepare_words(*weight_only.prepare(packed.packed, packed.scales, packed.zeros, bits,
                                                          torch.float32))  # float32 scales: no rounding
    w = dequant.dequantize_words(*exact, k, bits, torch.float32)
    assert rel(w.t(), packed.dequantize().double().cpu()) < 1e-6  # every code, scale and zero in place
    bias = torch.randn(n, device="cuda")
    for m in (7, dequant.MIN_ROWS + 3):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        ref = weight_only_reference(x, packed.packed, packed.scales, packed.zeros, k, bits, bias)
        got = dequant.dequantize_matmul(x, *words, k, bits, bias.to(dtype))
        assert got.shape == (m, n) and got.dtype == dtype and rel(got, ref) < TOLERANCE


@pytest.mark.parametrize("n, k", [(576, 1536), (200, 328)])
@pytest.mark.parametrize("bits, group, symmetric", [(4, 128, True), (4, 64, False), (8, -1, True)])
def test_gated_input_matches_reference(n, k, bits, group, symmetric):
    """A down projection fed ``[gate | up]``: ``silu(gate) * up`` is computed as the kernels load it,
    on every path (one row, tensor cores, dequantize + cuBLAS, the row layout), forced and autotuned."""
    from presso.runtime.triton import dequant

    dtype = torch.bfloat16
    packed, operands = _packed(n, k, bits, group, symmetric, dtype)
    words = gemv_words.prepare_words(*operands)
    for m in (1, 5, 40, dequant.MIN_ROWS + 1):
        both = torch.randn(m, 2 * k, device="cuda", dtype=dtype) * 2
        gate, up = both.chunk(2, -1)
        ref = weight_only_reference(torch.nn.functional.silu(gate) * up, packed.packed, packed.scales, packed.zeros,
                                    k, bits)
        if (bits, group) == (4, 128) or m > dequant.MIN_ROWS:  # the autotuned dispatch (tuning is slow)
            got = weight_only.weight_only_matmul(both, *operands, k, bits, words=words, gated=True)
            assert got.shape == (m, n) and rel(got, ref) < TOLERANCE, m
        rows = weight_only.weight_only_matmul(both, *operands, k, bits, gated=True,  # gated by torch first
                                              config=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=1))
        assert rel(rows, ref) < TOLERANCE, m
        if m == 1:
            forced = gemv_words.gemv_words(both, *words, k, bits, gated=True,
                                           config=dict(BLOCK_N=64, TILE_W=2, SPLIT_K=4, DEQUANT=1))
        else:
            forced = gemm_words.gemm_words(both, *words, k, bits, gated=True,
                                           config=dict(BLOCK_M=16, BLOCK_N=64, TILE_W=16, SPLIT_K=2, UNPACK=m % 2))
        assert rel(forced, ref) < TOLERANCE, m


@pytest.mark.parametrize("n, k", SHAPES)
def test_w8a8_matches_reference(n, k):
    linear = DynamicInt8Linear.from_weight(torch.randn(n, k), torch.randn(n))
    weight, scale, bias = (t.cuda() for t in (linear.weight_t.t().contiguous(), linear.weight_scale, linear.bias))
    for m in (1, 7, 64):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = w8a8_reference(x, weight, scale, bias)
        for config in [dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, SPLIT_K=4), dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64,
                                                                                SPLIT_K=1)]:
            got = w8a8.w8a8_matmul(x, weight, scale, bias.bfloat16(), config=config)
            assert rel(got, ref) < TOLERANCE, (m, config)
            fused = w8a8.w8a8_fused_matmul(x, weight, scale, bias.bfloat16(), config=config)
            assert rel(fused, ref) < TOLERANCE, (m, config)
        fused = w8a8.w8a8_fused_matmul(x.float(), weight, scale, bias)  # autotuned; float32: the same codes
        assert torch.allclose(fused, w8a8.w8a8_matmul(x.float(), weight, scale, bias), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("k", [576, 1000])
def test_w8a8_quantization_takes_in_the_producer(k):
    """SiLU gating and RMS norm in the launch that quantizes: in float32 the codes of the separate
    steps (a code may move by one where silu rounds differently); in bf16 the gated product
    agrees with the separate steps' (codes move by one where the two SiLUs round apart: 2.4e-3
    measured at 16 rows; its error against float64 is per-token int8's on a heavy-tailed input,
    1.0e-2 measured) and the normalized one is within the bound."""
    import torch.nn.functional as F

    from presso.runtime.triton import tuning

    linear = DynamicInt8Linear.from_weight(torch.randn(300, k), None)
    weight, scale = linear.weight_t.t().contiguous().cuda(), linear.weight_scale.cuda()
    norm_weight = torch.rand(k, device="cuda") + 0.5
    both, x = torch.randn(7, 2 * k, device="cuda"), torch.randn(7, k, device="cuda") * 3
    for (q, s), (q_ref, s_ref) in [(w8a8.quantize_rows(both, gated=True), w8a8.quantize_rows(tuning.silu_gate(both))),
                                   (w8a8.quantize_rows(x, norm_weight=norm_weight, eps=1e-5),
                                    w8a8.quantize_rows(F.rms_norm(x, (k,), norm_weight, 1e-5)))]:
        assert (q.int() - q_ref.int()).abs().max() <= 1 and (q != q_ref).float().mean() < 1e-3
        assert torch.allclose(s, s_ref, rtol=1e-5)
    for m in (1, 16):
        both16, x16, w16 = both[:m].bfloat16(), x[:m].bfloat16(), norm_weight.bfloat16()
        gate, up = both16.double().chunk(2, -1)
        separate = w8a8.w8a8_matmul(tuning.silu_gate(both16), weight, scale).double().cpu()
        assert rel(w8a8.w8a8_matmul(both16, weight, scale, gated=True), separate) < 5e-3, m
        assert rel(separate, w8a8_reference(F.silu(gate) * up, weight, scale)) < 2 * TOLERANCE, m
        ref = w8a8_reference(F.rms_norm(x16.double(), (k,), w16.double(), 1e-5), weight, scale)
        assert rel(w8a8.w8a8_matmul(x16, weight, scale, norm_weight=w16, eps=1e-5), ref) < TOLERANCE, m
    res = torch.randn(7, k, device="cuda").bfloat16()
    y, h = w8a8.w8a8_matmul(x.bfloat16(), weight, scale, norm_weight=norm_weight.bfloat16(), eps=1e-5, residual=res)
    assert torch.equal(h, x.bfloat16() + res)
    ref = w8a8_reference(F.rms_norm(h.double(), (k,), norm_weight.bfloat16().double(), 1e-5), weight, scale)
    assert rel(y, ref) < TOLERANCE
    with pytest.raises(ValueError, match="do not combine"):
        w8a8.quantize_rows(both, gated=True, norm_weight=norm_weight)


def test_per_token_quantization_rounds_like_the_reference():
    x = torch.randn(9, 1000, device="cuda") * torch.logspace(-3, 3, 9, device="cuda")[:, None]
    q, s = w8a8.quantize_rows(x)
    peak = x.abs().amax(-1)
    assert torch.allclose(s, peak / 127)
    assert (q.float() - x / s[:, None]).abs().max() <= 0.5 + 1e-4


def test_tuned_configurations_join_the_autotune_lists_once(tmp_path):
    """Entries of the sweep's file become configurations (split K zeroes the output first); one
    equal to a built-in configuration is not added twice; every shipped entry names known keys."""
    import json

    from presso.runtime.triton import tuning

    own = gemm_words._configs()
    first = dict(own[0].kwargs, num_warps=own[0].num_warps, num_stages=own[0].num_stages)
    new = dict(BLOCK_M=16, BLOCK_N=32, TILE_W=4, SPLIT_K=2, PAIRS=0, UNPACK=1, num_warps=2, num_stages=5)
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"gemm_words": [first, new], "device": "test"}))
    extra = tuning.tuned_configs("gemm_words", path=path)
    assert [c.kwargs["SPLIT_K"] for c in extra] == [first["SPLIT_K"], 2] and extra[1].pre_hook is tuning.zero_output
    assert len(tuning.merged(own, extra)) == len(own) + 1
    shipped = json.loads(tuning.TUNED.read_text())
    for kernel, keys in (("gemm_words", set(first)), ("gemv_words", {"BLOCK_N", "TILE_W", "SPLIT_K", "DEQUANT"})):
        assert all(keys - {"num_warps", "num_stages"} <= set(entry) for entry in shipped.get(kernel, []))
