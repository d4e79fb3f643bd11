"""split_low_rank: factorization math, rank policies, export parity, composition, errors."""

import pytest
import torch
from models import build, fast_only, other_inputs

import presso
from presso.errors import ConfigError, PassError
from presso.numerics import rel_error
from presso.passes.low_rank.factor import LowRankLinear, break_even, input_transform, spectrum
from presso.passes.low_rank.sequential import reduced_rank_fit
from presso.runtime.nbits import WeightOnlyLinear
from presso.testing import call, check_pass


def correlated_inputs(n=32, rows=2048):
    torch.manual_seed(0)
    return torch.randn(rows, n) @ torch.randn(n, n) * torch.linspace(0.1, 3, n)


@pytest.mark.parametrize("method", ["svd", "asvd", "whiten"])
def test_factors_reproduce_the_weight_at_full_rank(method):
    x, w = correlated_inputs(), torch.randn(24, 32)
    m, m_inv = input_transform(method, 32, x.t() @ x, x.pow(2).sum(0), x.shape[0])
    a, b = spectrum(w, m, m_inv).factors(24)
    assert torch.allclose(b @ a, w, atol=1e-4)


def test_whitened_truncation_error_is_the_dropped_spectrum_and_beats_plain_svd():
    x, w = correlated_inputs(), torch.randn(24, 32)
    rank = 8
    errors = {}
    for method in ("svd", "whiten"):
        m, m_inv = input_transform(method, 32, x.t() @ x, None, x.shape[0])
        spec = spectrum(w, m, m_inv)
        a, b = spec.factors(rank)
        errors[method] = float((x @ (b @ a).t() - x @ w.t()).pow(2).sum())
        if method == "whiten":
            assert errors[method] == pytest.approx(float(spec.s[rank:].pow(2).sum()), rel=1e-3)
    assert errors["whiten"] < errors["svd"]


def test_reduced_rank_fit_is_plain_whitening_on_unchanged_inputs_and_better_on_changed_ones():
    x, w = correlated_inputs(), torch.randn(24, 32)
    rank = 8
    m, m_inv = input_transform("whiten", 32, x.t() @ x, None, x.shape[0])
    a, b = spectrum(w, m, m_inv).factors(rank)
    a2, b2 = reduced_rank_fit(w, x.t() @ x, x.t() @ x, x.shape[0], rank)
    assert rel_error(x @ (b2 @ a2).t(), x @ (b @ a).t()) < 1e-2  # the same fit, up to the damping
    # an upstream layer distorts the inputs (x -> x_new); the fit targets the original output W x
    x_new = x @ (torch.eye(32) + 0.5 * torch.randn(32, 32) / 32**0.5)
    a3, b3 = reduced_rank_fit(w, x_new.t() @ x_new, x.t() @ x_new, x.shape[0], rank)
    m, m_inv = input_transform("whiten", 32, x_new.t() @ x_new, None, x.shape[0])
    a4, b4 = spectrum(w, m, m_inv).factors(rank)  # whitening on the new inputs, original weight
    target = x @ w.t()
    assert (x_new @ (b3 @ a3).t() - target).norm() < 0.95 * (x_new @ (b4 @ a4).t() - target).norm()


def test_weighted_outputs_trade_error_towards_the_outputs_that_matter():
    x, w = correlated_inputs(), torch.randn(24, 32)
    weight = torch.linspace(0.01, 10, 24)
    m, m_inv = input_transform("whiten", 32, x.t() @ x, None, x.shape[0])
    errors = {}
    for name, out_gram in (("plain", None), ("weighted", [torch.diag(weight**2)])):
        a, b = spectrum(w, m, m_inv, out_gram).factors(8)
        errors[name] = float(((x @ (b @ a - w).t()) * weight).norm())
    assert errors["weighted"] < 0.9 * errors["plain"]


def test_sensitivity_allocation_spends_the_budget_where_dropping_costs_most():
    from presso.passes.low_rank.factor import Spectrum
    from presso.passes.low_rank.split_low_rank import sensitivity_ranks

    flat, steep = 2 * torch.ones(32), torch.logspace(0, -4, 32)
    spectra = {"flat": Spectrum(None, flat, None, None), "steep": Spectrum(None, steep * 10, None, None)}
    shapes = {"flat": (32, 32), "steep": (32, 32)}
    ranks = sensitivity_ranks(spectra, shapes, ratio=0.5, round_to=1)
    kept = sum(r * 64 if r <= break_even(32, 32) else 32 * 32 for r in ranks.values())
    assert kept <= 0.5 * 2 * 32 * 32 and kept > 0.5 * 2 * 32 * 32 - 64
    assert ranks["flat"] > ranks["steep"]  # the steep spectrum loses little beyond its first directions


def test_output_gradient_grams_are_symmetric_per_output_and_leave_the_model_as_it_was():
    from presso.api import _trace, _working_copy
    from presso.pass_api import Context
    from presso.passes.common.loss import output_gradient_grams
    from presso.signature import normalize_inputs

    model, example = build("llama")
    graph = _trace(*_working_copy(model), normalize_inputs(example))
    graph.materialize()
    flags = {n: p.requires_grad for n, p in graph.module.named_parameters()}
    ctx = Context(example_inputs=example, calibration=[normalize_inputs(other_inputs("llama", example))])
    linears = {"model.layers.0.mlp.up_proj": graph.module.get_submodule("model.layers.0.mlp.up_proj")}
    grams = output_gradient_grams(graph, ctx, linears)
    g = grams["model.layers.0.mlp.up_proj"]
    assert g.shape == (64, 64) and torch.allclose(g, g.t()) and torch.linalg.eigvalsh(g.double()).min() > -1e-6
    assert {n: p.requires_grad for n, p in graph.module.named_parameters()} == flags
    assert all(p.grad is None for p in graph.module.parameters())


def test_sequential_whitening_fits_blocks_in_order_and_lowers_the_output_error():
    model, example = build("llama")
    calibration = [other_inputs("llama", example) for _ in range(16)]  # 384 rows for 64 inputs: enough to refit
    reference = call(model, example)
    errors = {}
    for sequential in (False, True):
        p = presso.make_pass("split_low_rank", ratio=0.3, method="whiten", targets=("*mlp*",), sequential=sequential)
        compiled = presso.compile(model, [p], example_inputs=example, calibration=calibration)
        stats = compiled.report["passes"][0]["stats"]
        assert stats["fitted_sequentially"] == (len(stats["factored"]) if sequential else 0)
        errors[sequential] = rel_error(call(compiled, example), reference)
    assert errors[True] < errors[False]


@pytest.mark.parametrize("name", fast_only(["llama", "gpt2", "bert", "opt", "vit"], ("llama", "bert")))
def test_factored_models_export_and_match_in_onnx_runtime(name):
    model, example = build(name)
    calibration = [other_inputs(name, example) for _ in range(4)]
    p = presso.make_pass("split_low_rank", ratio=0.3, method="whiten", allocate="sensitivity")
    compiled = check_pass(p, model, example, tolerance=p.tolerance, calibration=calibration, backend="onnxruntime")
    stats = compiled.report["passes"][0]["stats"]
    assert stats["params_removed_in_selected"] == pytest.approx(0.3, abs=0.03)
    assert any(isinstance(m, LowRankLinear) for m in compiled.module.modules())
    assert compiled.report["backend_rel_error"] < 1e-5


def test_uniform_ratio_with_round_to_and_targets():
    model, example = build("llama")
    compiled = presso.compile(
        model,
        [presso.make_pass("split_low_rank", ratio=0.5, method="svd", targets=("*mlp*",), round_to=4)],
        example_inputs=example,
    )
    factored = compiled.report["passes"][0]["stats"]["factored"]
    assert factored and all("mlp" in p for p in factored) and all(r % 4 == 0 for r in factored.values())
    assert isinstance(compiled.module.model.layers[0].mlp.up_proj, LowRankLinear)
    assert isinstance(compiled.module.model.layers[0].self_attn.q_proj, torch.nn.Linear)


def test_a_layer_that_would_grow_is_left_alone_and_reported():
    model, example = build("llama")
    compiled = presso.compile(
        model, [presso.make_pass("split_low_rank", rank=18, method="svd", share_inputs=False)], example_inputs=example
    )
    stats = compiled.report["passes"][0]["stats"]
    assert "model.layers.0.self_attn.q_proj" in stats["left_alone"]  # 32 x 32: break-even rank 15
    assert break_even(32, 32) == 15
    assert stats["factored"]["model.layers.0.mlp.up_proj"] == 18  # 64 x 32: break-even 21
    assert "would not save parameters" in stats["left_alone"]["model.layers.0.self_attn.q_proj"]


def test_energy_option_and_composition_with_weight_quantization():
    model, example = build("llama")
    calibration = [other_inputs("llama", example) for _ in range(2)]
    passes = [
        presso.make_pass("split_low_rank", energy=0.9, method="asvd", targets=("*mlp*",)),
        presso.make_pass("quantize_weights", bits=8, group_size=-1),
    ]
    compiled = presso.compile(model, passes, example_inputs=example, calibration=calibration)
    assert [p["name"] for p in compiled.report["passes"]] == ["split_low_rank", "quantize_weights"]
    assert rel_error(call(compiled, example), call(model, example)) < 4


@pytest.mark.parametrize(
    "options, error, message",
    [
        (dict(), ConfigError, "exactly one of ratio"),
        (dict(ratio=0.2, rank=4), ConfigError, "exactly one of ratio"),
        (dict(ratio=1.2), ConfigError, "must be in"),
        (dict(rank=4, allocate="sensitivity"), ConfigError, "spreads a ratio"),
        (dict(ratio=0.2, method="qr"), ConfigError, "method"),
    ],
)
def test_bad_options(options, error, message):
    with pytest.raises(error, match=message):
        presso.make_pass("split_low_rank", **options)


def test_missing_targets_and_calibration_are_named():
    model, example = build("llama")
    with pytest.raises(ConfigError, match="no linear matches targets"):
        presso.compile(
            model,
            [presso.make_pass("split_low_rank", ratio=0.2, method="svd", targets=("*conv*",))],
            example_inputs=example,
        )
    with pytest.raises(PassError, match="requires calibration"):
        presso.compile(model, [presso.make_pass("split_low_rank", ratio=0.2, method="whiten")], example_inputs=example)


def test_share_then_split_then_quantize_compose_in_one_compile_with_each_step_reported():
    model, example = build("llama")
    calibration = [other_inputs("llama", example) for _ in range(3)]
    passes = [
        presso.make_pass("share_attention_heads", kv_heads=1),
        presso.make_pass("split_low_rank", ratio=0.3, method="whiten"),
        presso.make_pass("quantize_weights", bits=8, group_size=-1),
    ]
    compiled = presso.compile(model, passes, example_inputs=example, calibration=calibration, backend="onnxruntime")
    steps = compiled.report["passes"]
    assert [s["name"] for s in steps] == ["share_attention_heads", "split_low_rank", "quantize_weights"]
    params = [compiled.report["params_before"]] + [s["params_after"] for s in steps]
    sizes = [compiled.report["bytes_before"]] + [s["bytes_after"] for s in steps]
    assert params[0] > params[1] > params[2] == params[3]  # quantizing keeps the parameter count
    assert sizes[0] > sizes[1] > sizes[2] > 2 * sizes[3]
    assert all(s["modified"] and s["rel_error_step"] < 1.0 for s in steps)
    assert compiled.report["backend_rel_error"] < 1e-4
    assert "| split_low_rank |" in compiled.report.to_markdown()
    mlp = compiled.module.model.layers[0].mlp  # gate and up kept one (quantized) first factor
    assert isinstance(mlp.gate_proj.first, WeightOnlyLinear) and mlp.gate_proj.first is mlp.up_proj.first


def test_linears_that_read_one_tensor_share_a_first_factor_that_is_exact_at_full_rank():
    from presso.passes.low_rank.factor import low_rank_linears

    x, gate, up = correlated_inputs(), torch.randn(48, 32), torch.randn(40, 32)
    m, m_inv = input_transform("whiten", 32, x.t() @ x, None, x.shape[0])
    a, b = spectrum(torch.cat([gate, up]), m, m_inv).factors(32)
    new_gate, new_up = low_rank_linears(a, b, [None, torch.ones(40)], [48, 40], torch.float32)
    assert new_gate.first is new_up.first
    assert torch.allclose(new_gate(x), x @ gate.t(), atol=1e-3 * x.abs().max())
    assert torch.allclose(new_up(x), x @ up.t() + 1, atol=1e-3 * x.abs().max())


def test_shared_first_factors_are_reported_and_counted_once():
    model, example = build("llama")
    calibration = [other_inputs("llama", example) for _ in range(4)]
    stats = {}
    for share in (False, True):
        p = presso.make_pass("split_low_rank", ratio=0.3, targets=("*mlp*",), share_inputs=share)
        compiled = check_pass(p, model, example, tolerance=p.tolerance, calibration=calibration)
        stats[share] = compiled.report["passes"][0]["stats"]
        counted = sum(t.numel() for t in compiled.module.parameters())  # a shared tensor counts once
        assert compiled.report["params_after"] == counted
        assert stats[share]["params_removed_in_selected"] == pytest.approx(0.3, abs=0.03)
    assert not stats[False]["sharing_first_factor"]
    assert ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"] in stats[True]["sharing_first_factor"]
    # the same parameters buy a higher rank for gate and up when they share
    assert (
        stats[True]["factored"]["model.layers.0.mlp.up_proj"] > stats[False]["factored"]["model.layers.0.mlp.up_proj"]
    )


@pytest.mark.slow  # four compiles; make test composes passes in test_share_then_split_then_quantize_compose_...
def test_pruning_composes_before_a_split_and_names_the_way_out_after_a_shared_one():
    model, example = build("llama")
    calibration = [other_inputs("llama", example) for _ in range(3)]
    prune, split = (presso.make_pass("prune_structured", ratio=0.2), presso.make_pass("split_low_rank", ratio=0.3))
    compiled = presso.compile(
        model, [prune, split], example_inputs=example, calibration=calibration, backend="onnxruntime"
    )
    assert compiled.report["backend_rel_error"] < 1e-4
    assert compiled.report["passes"][1]["stats"]["sharing_first_factor"]
    with pytest.raises(PassError, match="'prune_structured' cannot run after 'split_low_rank'") as info:
        presso.compile(model, [split, prune], example_inputs=example, calibration=calibration)
    assert "run it before split_low_rank, or split with share_inputs=False" in info.value.hint
    unshared = presso.make_pass("split_low_rank", ratio=0.3, share_inputs=False)
    compiled = presso.compile(
        model, [unshared, prune], example_inputs=example, calibration=calibration, backend="onnxruntime"
    )
    assert compiled.report["backend_rel_error"] < 1e-4


@pytest.mark.parametrize(
    "quantizer, options",
    fast_only([
        ("quantize_dynamic_int8", {}),
        ("quantize_static_int8", dict(dynamic=(), skip=())),  # every linear static, so each is counted once
        ("quantize_weights", dict(bits=4, group_size=16, method="gptq")),
    ], lambda case: case[0] == "quantize_dynamic_int8", unpack=True),
)
def test_each_quantizer_replaces_a_shared_factor_once_at_every_path(quantizer, options):
    model, example = build("llama")
    calibration = [other_inputs("llama", example) for _ in range(3)]
    passes = [presso.make_pass("split_low_rank", ratio=0.3), presso.make_pass(quantizer, **options)]
    compiled = presso.compile(model, passes, example_inputs=example, calibration=calibration, backend="onnxruntime")
    attention = compiled.module.model.layers[1].self_attn
    assert attention.q_proj.first is attention.k_proj.first is attention.v_proj.first
    assert not isinstance(attention.q_proj.first, torch.nn.Linear)  # quantized, and still one module
    linears = {
        id(m)
        for m in compiled.module.modules()
        if not isinstance(m, (LowRankLinear, torch.nn.Sequential))
        and hasattr(m, "in_features")
        and "Linear" in type(m).__name__
    }
    assert compiled.report["passes"][1]["stats"]["quantized"] == len(linears)  # each module once
    assert compiled.report["backend_rel_error"] < 1e-4
